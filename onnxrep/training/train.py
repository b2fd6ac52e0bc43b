"""Quantization-aware training through a torch round-trip.

``qat(model, train_data, loss_fn, config)``:

1. the starting FP32 model: with ``from_ptq`` (default), what ``onnxrep quantize`` (same target
   and weight granularity) quantizes: its verified passes and its bias-corrected biases, so
   the first step trains the PTQ model, and that PTQ model is kept for step 7; else the
   passes alone (:func:`onnxrep.pipeline.optimize`: CLE, ..., verified), opset 13 first when
   per-channel;
2. BN restore on the calibration data (:func:`onnxrep.pipeline.restore_bn`):
   a BN after each Conv with gamma = sqrt(var + eps), beta = mean, so the function is unchanged
   and training has a per-channel scale and shift per conv (running statistics from the first
   step by default; batch statistics for ``freeze_bn_after`` steps);
3. ONNX -> torch (:mod:`.convert`); torch and onnxruntime must agree on the first
   calibration batch within ``rtol`` (relative to the largest output), else
   :class:`VerificationError`; without labels the input model itself, converted and checked
   the same way, is the FP32 teacher (a PTQ start's biases are corrected for INT8 noise);
4. fake quantization (:mod:`.fake_quant`) placed as ``config.target`` places Q/DQ, activation
   ranges = min/max over the calibration data, those the PTQ model quantizes taken from it
   (:func:`.fake_quant.ranges_from_qdq`), then fixed or an exponential average;
5. training: AdamW with per-tensor relative steps (``_relative_groups``) or SGD (Nesterov
   momentum), cosine learning-rate decay to 0 over all steps;
   loss = cross-entropy on labels when the data has them, else distillation against the FP32
   model, per output by what it holds (:mod:`.distill`: KL for Softmax probabilities and
   [N, K] logits, normalized MSE otherwise; ``Distill`` forces one), or
   ``loss_fn(output, target)`` with target = labels or the FP32 model's output; training stops
   after ``max_steps`` steps or ``max_minutes`` of training, whichever comes first;
6. export to QDQ with BN folded (:mod:`.export`), then the target's post-processing and
   rule check (``config.target``: a TensorRT export that breaks a placement rule raises
   :class:`VerificationError`); onnxruntime (optimizations on, int8 kernels) vs the torch
   fake-quant model on the first calibration batch is reported as ``deployment`` ("what was
   trained is what is deployed");
7. distilling from a PTQ start with ``keep_better``: the export and the PTQ model are scored
   against FP32 on the calibration data and the better is returned (:mod:`.guard`).

Determinism: data order is a function of (seed, epoch) and nothing else is random, so a run
is reproducible and a resumed run (``checkpoint_dir`` + ``resume``) continues exactly where the
checkpoint was taken. Under ``torchrun`` (WORLD_SIZE > 1) training runs with
DistributedDataParallel over gloo: every rank reads the same global batch order and trains on
its slice of each batch; BN statistics and activation ranges are reduced over the global batch
and the loss is scaled so gradients are those of the global batch, so N processes compute what
one does (up to float summation order). Rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F

from onnxrep import verify
from onnxrep.data.readers import Dataset, as_dataset, check_feeds, load_data
from onnxrep.errors import DataError, InputError, TrainingDivergedError, VerificationError
from onnxrep.ir.model import check_opset, opset_version
from onnxrep.pipeline import OptimizeConfig, optimize
from onnxrep.progress import Progress, log, quiet
from onnxrep.training import fake_quant
from onnxrep.training.distill import OutputKind, distill_loss, output_kinds
from onnxrep.training.export import export_qdq
from onnxrep.training.guard import Choice, keep_better
from onnxrep.training.config import QATConfig
from onnxrep.training.fake_quant import Mode, QuantPlan, prepare
from onnxrep.training.convert import GraphModule, to_torch

CHECKPOINT = "qat_checkpoint.pt"
CHECKPOINT_VERSION = 1
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step:
    epoch: int
    step: int
    loss: float
    accuracy: float | None  # on the training batch, with labels


@dataclass
class QATResult:
    """The QDQ model and how it was made. ``float_model``: the FP32 model that was trained from
    (after the passes, bias correction with ``from_ptq``, and BN restore); ``net``: the
    trained torch fake-quant model (eval mode); ``calibration``: the calibration data used;
    ``conversion``: torch vs onnxruntime on the float model before training; ``deployment``:
    the exported model in onnxruntime (int8 kernels) vs the torch fake-quant model, both on the
    first calibration batch; ``choice``:
    with ``keep_better``, whether ``model`` is the export or the PTQ model training started
    from (``net`` and ``deployment`` describe the export either way)."""

    model: onnx.ModelProto
    float_model: onnx.ModelProto
    net: GraphModule
    calibration: Dataset
    history: list[Step]
    conversion: verify.Comparison
    deployment: verify.Comparison
    restored_bn: int
    layers: int
    activations: int
    skips: list
    steps: int
    samples: int
    seconds: float  # all of it: passes, calibration, training, export, checks
    train_seconds: float  # the training loop alone (this run's part when resumed)
    samples_per_second: float  # training throughput of this run
    resumed_from: int | None = None
    choice: Choice | None = None  # keep_better's record: the export or the PTQ start
    ptq: onnx.ModelProto | None = None  # the PTQ model a from_ptq run started from


def qat(model: onnx.ModelProto, train_data, loss_fn: LossFn | None = None,
        config: QATConfig | None = None, *, calib=None) -> onnx.ModelProto:
    """Quantization-aware training of ``model`` (not modified) on ``train_data``; returns the
    QDQ INT8 model. ``train_data``: a torch DataLoader or any iterable of (inputs, labels)
    pairs, feed dicts (optional ``labels`` key) or input batches; or any source
    :func:`~onnxrep.data.load_data` takes (.npz with ``labels``, .npy, image
    folder, arrays). ``calib``: calibration data (default: the first ``calib_samples``
    training samples)."""
    return qat_with_details(model, train_data, loss_fn, config, calib=calib).model


def qat_with_details(model: onnx.ModelProto, train_data, loss_fn: LossFn | None = None,
                     config: QATConfig | None = None, *, calib=None) -> QATResult:
    """Like :func:`qat`, also returning the training history and the checks."""
    config = config or QATConfig()
    check_opset(model)
    created = _init_distributed()
    group = dist.new_group(backend="gloo") if _world() > 1 else None
    try:
        with fake_quant.process_group(group), quiet(_world() > 1 and _rank() != 0):
            return _qat(model, train_data, loss_fn, config, calib)
    finally:
        if created:
            dist.destroy_process_group()


def _qat(model, train_data, loss_fn, config: QATConfig, calib) -> QATResult:
    start = time.monotonic()
    torch.manual_seed(config.seed)
    data = TrainData(train_data, model, config.batch_size, config.seed)
    calib_set = _calibration(calib, data, model, config)
    work, restored, ptq = _prepare_float(model, calib_set, config)
    net = to_torch(work)
    first = calib_set.first_batch()
    conversion = _check_conversion(work, net, first, config.rtol)
    teacher = None
    if not data.has_labels:
        # the FP32 model: a PTQ start's float model carries biases corrected for INT8 noise
        teacher = copy.deepcopy(net) if ptq is None else _fp32_teacher(model, first, config.rtol)
    target = config.profile
    plan = prepare(net, config.fake_quant(),
                   None if target.quantizes_outputs else target.input_layout(work), follow=ptq)
    # a PTQ start quantizes what PTQ quantizes and takes PTQ's ranges; only tensors PTQ left
    # float are measured here
    if ptq is None or fake_quant.ranges_from_qdq(plan, ptq) < len(plan.activations):
        _calibrate(net, plan, calib_set)
        if ptq is not None:  # calibration widened PTQ's ranges to its own: set them again
            fake_quant.ranges_from_qdq(plan, ptq)
    trainer = _Trainer(net, plan, teacher, data, loss_fn, config, _fingerprint(work, config),
                       output_kinds(work))
    resumed = trainer.load() if config.resume else None
    trainer.run()
    net.eval()
    plan.set_mode(Mode.EVAL)
    qdq = target.finish(export_qdq(work, plan))
    broken = target.violations(qdq, per_channel=config.per_channel)
    if broken:
        raise VerificationError(f"the QAT export breaks {target.name}'s placement rules: "
                                + "; ".join(broken[:3]) + (f" (+{len(broken) - 3} more)"
                                                           if len(broken) > 3 else ""))
    deployment = _check_deployment(qdq, net, first)
    choice = None
    if config.keep_better and ptq is not None and teacher is not None and loss_fn is None:
        qdq, choice = keep_better(model, qdq, ptq, calib_set)
        log(f"qat: {choice.summary()}")
    return QATResult(qdq, work, net, calib_set, trainer.history, conversion, deployment,
                     restored, len(plan.layers), len(plan.activations), plan.skips, trainer.step,
                     trainer.samples, time.monotonic() - start, trainer.seconds,
                     trainer.run_samples / trainer.seconds if trainer.seconds > 0 else 0.0,
                     resumed, choice, ptq)


# ---- steps 1-4 ----------------------------------------------------------------------------------

def _calibration(calib, data: "TrainData", model, config: QATConfig) -> Dataset:
    if calib is not None:
        return as_dataset(calib, model, batch_size=config.batch_size)
    feeds = data.head(config.calib_samples)
    return load_data(feeds, model, batch_size=config.batch_size)


def _prepare_float(model: onnx.ModelProto, calib: Dataset, config: QATConfig
                   ) -> tuple[onnx.ModelProto, int, onnx.ModelProto | None]:
    """The FP32 model training starts from, on a copy: ``onnxrep quantize``'s prepared and
    bias-corrected float model (``from_ptq``; its QDQ model is returned too) or the passes
    alone; then BN restore. Returns (model, number of BNs restored, PTQ model or None)."""
    ptq = None
    if config.from_ptq:
        from onnxrep.ptq.quantizer import QuantizeConfig, quantize_with_details

        log("qat: onnxrep quantize first (passes, calibration, bias correction); training "
            "starts from its model")
        done = quantize_with_details(model, calib, QuantizeConfig(
            per_channel=config.per_channel, optimize=config.optimize, target=config.target))
        work, ptq = done.float_model, done.model
    else:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        if config.per_channel and opset_version(work) < 13:
            from onnxrep.ptq.quantizer import convert_opset

            work = convert_opset(work, 13)
        if config.optimize:
            log("qat: equivalence-preserving passes (CLE, ...)")
            work = optimize(work, OptimizeConfig(), calib=calib)
    restored = 0
    if config.restore_bn:
        from onnxrep.pipeline import restore_bn_with_details

        log("qat: restoring BatchNormalization from calibration statistics")
        result = restore_bn_with_details(work, calib, rtol=OptimizeConfig.rtol,
                                         batch_size=config.batch_size)
        work, restored = result.model, result.result.summary.restored
    return work, restored, ptq


def _fp32_teacher(model: onnx.ModelProto, feeds, rtol: float) -> GraphModule:
    """The input model in torch, checked against onnxruntime like the student."""
    net = to_torch(model)
    _check_conversion(model, net, feeds, rtol)
    return net.eval()


def _torch_feeds(net: GraphModule, feeds: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in net.input_names]


def _outputs(net: GraphModule, result) -> dict[str, np.ndarray]:
    values = result if isinstance(result, tuple) else (result,)
    return {n: v.detach().numpy() for n, v in zip(net.output_names, values)}


def _check_conversion(model, net: GraphModule, feeds, rtol: float) -> verify.Comparison:
    with torch.no_grad():
        mine = _outputs(net, net(*_torch_feeds(net, feeds)))
    comparison = verify.compare_outputs(verify.run(model, feeds), mine)
    verify.check(comparison, rtol, "the torch conversion (on the first calibration batch)")
    return comparison


def _calibrate(net: GraphModule, plan: QuantPlan, calib: Dataset) -> None:
    net.eval()
    plan.set_mode(Mode.CALIBRATE)
    with torch.no_grad(), Progress(calib.num_samples, "qat: calibrating") as bar:
        for feeds in calib.batches():
            net(*_torch_feeds(net, feeds))
            bar.update(len(next(iter(feeds.values()))))


def _check_deployment(qdq: onnx.ModelProto, net: GraphModule, feeds) -> verify.Comparison:
    with torch.no_grad():
        mine = _outputs(net, net(*_torch_feeds(net, feeds)))
    return verify.compare_outputs(mine, verify.run(verify.session(qdq, optimized=True), feeds))


def _fingerprint(model: onnx.ModelProto, config: QATConfig) -> str:
    """What a checkpoint must match to be resumed: the prepared model and the training setup."""
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(repr(sorted(config.fingerprint_fields().items())).encode())
    return h.hexdigest()


# ---- data ---------------------------------------------------------------------------------------

class TrainData:
    """Training batches as (input tensors in model-input order, labels or None).

    Sources ``load_data`` takes with a known sample count are held in memory and shuffled per
    epoch with a generator seeded by (seed, epoch); other iterables (DataLoader, lists,
    generators) are read in their own order, with torch's global RNG seeded by (seed, epoch)
    first so a shuffling DataLoader repeats its order. A one-shot iterator serves one epoch."""

    def __init__(self, source, model: onnx.ModelProto, batch_size: int, seed: int):
        self.specs = verify.input_specs(model)
        self.names = [s.name for s in self.specs]
        self.batch_size, self.seed = batch_size, seed
        self.arrays: list[np.ndarray] | None = None
        self.labels: np.ndarray | None = None
        self.source = source
        if _is_dataset_source(source):
            ds = as_dataset(source, model, batch_size=4096)
            if ds.num_samples is None:
                self.source = _Replay(ds)
            else:
                parts = list(ds.batches())
                self.arrays = [np.concatenate([p[n] for p in parts]) for n in self.names]
                self.labels = ds.labels
        self._head: tuple | None = None
        self._pending: Iterator | None = None  # a peeked one-shot source, head first
        self._used = False

    @property
    def has_labels(self) -> bool:
        if self.arrays is not None:
            return self.labels is not None
        return self._peek()[1] is not None

    def batches_per_epoch(self) -> int | None:
        if self.arrays is not None:
            return -(-len(self.arrays[0]) // self.batch_size)
        return _len(self.source)

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` samples as feeds (for calibration)."""
        if self.arrays is not None:
            return {k: a[:n] for k, a in zip(self.names, self.arrays)}
        if iter(self.source) is self.source:
            raise DataError("training from a one-shot iterator needs separate calibration data "
                            "(calib=...)")
        taken, count = [], 0
        for inputs, _ in self._iterate():
            taken.append(inputs)
            count += len(inputs[0])
            if count >= n:
                break
        return {k: np.concatenate([t[i].numpy() for t in taken])[:n]
                for i, k in enumerate(self.names)}

    def epoch(self, epoch: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
        if self.arrays is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.arrays[0]), generator=g).numpy()
            for start in range(0, len(order), self.batch_size):
                rows = np.sort(order[start:start + self.batch_size])
                yield ([torch.from_numpy(a[rows]) for a in self.arrays],
                       None if self.labels is None else torch.from_numpy(self.labels[rows]))
            return
        torch.manual_seed(self.seed * 1_000_003 + epoch)
        yield from self._iterate()

    def _peek(self):
        if self._head is None:
            stream = self._iterate()
            self._head = next(stream, None)
            if self._head is None:
                raise DataError("the training data holds no samples")
            if iter(self.source) is self.source:
                self._pending = itertools.chain([self._head], stream)
            else:
                stream.close()
        return self._head

    def _iterate(self):
        if self._pending is not None:
            stream, self._pending = self._pending, None
            yield from stream
            return
        one_shot = iter(self.source) is self.source
        if one_shot and self._used:
            raise DataError("the training data is a one-shot iterator and was already read; "
                            "pass a list, a DataLoader or a file to train more than one epoch")
        self._used = self._used or one_shot
        offset = 0
        for i, item in enumerate(self.source):
            inputs, labels = self._parse(item, i, offset)
            offset += len(inputs[0])
            yield inputs, labels

    def _parse(self, item, i: int, offset: int):
        labels = None
        if isinstance(item, Mapping):
            feeds = {k: v for k, v in item.items() if k != "labels"}
            labels = item.get("labels")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            x, labels = item
            feeds = dict(x) if isinstance(x, Mapping) else {self._single(i): x}
        else:
            feeds = {self._single(i): item}
        feeds = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                 for k, v in feeds.items()}
        checked = check_feeds(feeds, self.specs, f"training batch {i}", offset)
        inputs = [torch.from_numpy(checked[n]) for n in self.names]
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor)
                                                else labels)).reshape(-1)
            if labels.dtype.is_floating_point or len(labels) != len(inputs[0]):
                raise DataError(f"training batch {i}: labels must be integers, one per sample "
                                f"({len(inputs[0])}), got {tuple(labels.shape)} {labels.dtype}")
            labels = labels.long()
        return inputs, labels

    def _single(self, i: int) -> str:
        if len(self.names) != 1:
            raise DataError(f"training batch {i}: a model with {len(self.names)} inputs needs "
                            f"dicts {{input name: array}} ({', '.join(self.names)})")
        return self.names[0]


class _Replay:
    """A streamed Dataset as a re-iterable of feed dicts."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __iter__(self):
        return self.dataset.batches()


def _is_dataset_source(source) -> bool:
    return isinstance(source, (str, os.PathLike, np.ndarray, Mapping, Dataset)) or callable(
        getattr(source, "get_next", None))


def _len(source) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


# ---- distributed ------------------------------------------------------------------------------

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if _world() > 1 else 0


def _init_distributed() -> bool:
    """Join the torchrun process group (gloo) when launched with WORLD_SIZE > 1; True when
    this call created it (and the caller must destroy it)."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    return created


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process), also after the group is gone."""
    if _world() > 1:
        return _rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _relative_groups(params: list[torch.Tensor], lr: float) -> list[dict]:
    """One Adam parameter group per tensor with learning rate ``lr`` x the tensor's RMS now.
    Adam moves every element by about its learning rate per step whatever the gradient's
    size, so this makes ``lr`` a relative step: a pretrained detector's head conv with weights
    near 3e-5 (PP-OCRv4 det) and a stem near 1 change by the same fraction. A tensor of zeros
    keeps ``lr`` itself."""
    groups = []
    for p in params:
        rms = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
        groups.append({"params": [p], "lr": lr * rms if rms > 0 else lr})
    return groups


def _past(deadline: float) -> bool:
    """Whether the wall clock passed ``deadline`` (on every rank alike under torchrun: rank 0
    decides, so no process stops a step before the others)."""
    late = torch.tensor([float(time.monotonic() >= deadline)])
    if _world() > 1:
        dist.broadcast(late, 0)
    return bool(late.item())


# ---- step 5 -------------------------------------------------------------------------------------

class _Trainer:
    def __init__(self, net: GraphModule, plan: QuantPlan, teacher: GraphModule | None,
                 data: TrainData, loss_fn: LossFn | None, config: QATConfig, fingerprint: str,
                 kinds: list[OutputKind]):
        self.net, self.plan, self.teacher, self.data = net, plan, teacher, data
        self.loss_fn, self.config, self.fingerprint = loss_fn, config, fingerprint
        self.history: list[Step] = []
        self.kinds = kinds  # distillation: what each output holds
        self.step = self.epoch = self.batch = self.samples = 0
        self.seconds, self.run_samples = 0.0, 0
        params = [p for p in net.parameters() if p.requires_grad]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.AdamW(_relative_groups(params, config.lr),
                                               lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             nesterov=config.momentum > 0,
                                             weight_decay=config.weight_decay)
        per_epoch = data.batches_per_epoch()
        total = per_epoch * config.epochs if per_epoch else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
            if total else (lambda s: 1.0))
        self.model = net
        if config.batch_size < _world():
            raise InputError(f"batch size {config.batch_size} is smaller than the number of "
                             f"processes ({_world()})")
        if _world() > 1:
            # a conv bias before a BN in batch-statistics mode gets no gradient (BN removes it)
            self.model = torch.nn.parallel.DistributedDataParallel(
                net, broadcast_buffers=False, find_unused_parameters=True)

    # -- checkpoints
    def _path(self) -> Path | None:
        d = self.config.checkpoint_dir
        return Path(d) / CHECKPOINT if d is not None else None

    def save(self) -> None:
        path = self._path()
        if path is None or not is_main_process():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                 "step": self.step, "epoch": self.epoch, "batch": self.batch,
                 "samples": self.samples, "net": self.net.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "history": [vars(h) for h in self.history]}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self) -> int:
        path = self._path()
        if not path.exists():
            raise InputError(f"no checkpoint to resume from at {path}", option="resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path}: cannot read the checkpoint: {exc}") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != \
                self.fingerprint:
            raise InputError(f"{path} was written for another model, data setup or training "
                             "configuration; remove it or do not resume", option="resume")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.samples = state["samples"]
        self.history = [Step(**h) for h in state["history"]]
        log(f"qat: resumed from {path} at step {self.step} (epoch {self.epoch + 1}, "
            f"batch {self.batch})")
        return self.step

    # -- the loop
    def run(self) -> None:
        start = time.monotonic()
        try:
            self._loop()
        finally:
            self.seconds = time.monotonic() - start

    def _loop(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
        self.plan.set_mode(Mode.TRAIN)
        self.net.train()
        if self.teacher is not None:
            self.teacher.eval()
        per_epoch = self.data.batches_per_epoch()
        while self.epoch < cfg.epochs:
            self._maybe_freeze()
            with Progress(per_epoch, f"qat epoch {self.epoch + 1}/{cfg.epochs}") as bar:
                if self.batch:
                    bar.update(self.batch)
                for k, (inputs, labels) in enumerate(self.data.epoch(self.epoch)):
                    if k < self.batch:
                        continue
                    self._train_step(inputs, labels, bar)
                    self.batch += 1
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        self.save()
                        return
                    if deadline is not None and _past(deadline):
                        log(f"qat: stopped after {cfg.max_minutes:g} minutes of training, at "
                            f"step {self.step}")
                        self.save()
                        return
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
            self.epoch, self.batch = self.epoch + 1, 0
            self.save()

    def _maybe_freeze(self) -> None:
        k = self.config.freeze_bn_after
        if k is not None and self.step >= k:
            self.plan.freeze_bn()

    def _train_step(self, inputs, labels, bar: Progress) -> None:
        n = len(inputs[0])
        world, rank = _world(), _rank()
        if n < world:
            log(f"qat: skipped a batch of {n} samples, fewer than the {world} processes")
            return
        lo, hi = rank * n // world, (rank + 1) * n // world
        local = [x[lo:hi] for x in inputs]
        target = labels[lo:hi] if labels is not None else None
        output = self.model(*local)
        loss, correct = self._loss(output, target, local)
        scale = (hi - lo) * world / n
        self.optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        self._check_finite(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.samples += n
        self.run_samples += n
        stats = torch.tensor([float(loss.detach()) * (hi - lo),
                              float(correct if correct is not None else 0)])
        if world > 1:
            dist.all_reduce(stats)
        acc = float(stats[1]) / n if correct is not None else None
        self.history.append(Step(self.epoch, self.step, float(stats[0]) / n, acc))
        fields = {"loss": self.history[-1].loss}
        if acc is not None:
            fields["acc"] = acc
        bar.update(1, **fields)
        self._maybe_freeze()

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss or gradient reaches the weights: one step later the
        activation observers would hold NaN ranges and fail far from the cause."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            raise TrainingDivergedError(
                f"training diverged at step {self.step + 1}: loss {loss.item():.4g}, gradient "
                f"norm {float(norm):.4g} (learning rate {self.scheduler.get_last_lr()[0]:.3g}; "
                "try a lower one)", option="lr")

    def _loss(self, output, labels, inputs) -> tuple[torch.Tensor, int | None]:
        first = output[0] if isinstance(output, tuple) else output
        correct = None
        if labels is not None and first.ndim == 2:
            correct = int((first.detach().argmax(1) == labels).sum())
        if self.loss_fn is not None:
            target = labels if labels is not None else self._teacher(inputs)
            return self.loss_fn(output, target), correct
        if labels is not None:
            if first.ndim != 2:
                raise DataError(f"labels need [N, classes] logits; the model's first output "
                                f"has shape {tuple(first.shape)}")
            if int(labels.min()) < 0 or int(labels.max()) >= first.shape[1]:
                raise DataError(f"labels range {int(labels.min())}..{int(labels.max())} but "
                                f"the model has {first.shape[1]} classes")
            return F.cross_entropy(first, labels), correct
        return self._distill(output, self._teacher(inputs)), correct

    def _teacher(self, inputs):
        with torch.no_grad():
            return self.teacher(*inputs)

    def _distill(self, output, target) -> torch.Tensor:
        outs = output if isinstance(output, tuple) else (output,)
        refs = target if isinstance(target, tuple) else (target,)
        return distill_loss(outs, refs, self.kinds, self.config.distill)
