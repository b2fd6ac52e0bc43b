"""Accuracy, fidelity to a reference model and throughput over a whole data set.

Top-k accuracy needs labels and a classifier-shaped first output ([N, K] logits or
probabilities): a sample counts when its label is among its k largest scores. Top-k with
k >= K (k > 1) is trivially 1 and is skipped.

Fidelity to a reference (e.g. the FP32 model of an INT8 one) uses the definitions of
:func:`onnxrep.verify.metrics`, accumulated over every sample of every batch (not averaged per
batch): max |ref - cand|; rel = max |ref - cand| / max |ref| (at least the output's range when a
bounded activation such as Sigmoid produces it: :func:`onnxrep.verify.output_bounds`);
SQNR = 10 log10(sum ref^2 / sum (ref - cand)^2); cosine = sum ref*cand / (||ref|| ||cand||);
top-1 agreement = share of samples whose argmax matches ([N, K] outputs).

The model runs in ``runtime`` ("onnxruntime", graph optimizations on, or "openvino": see
:mod:`onnxrep.runtime`), the reference always in onnxruntime; ``seconds`` counts only the
evaluated model's own run calls (not data loading, not the reference).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxrep.data import as_dataset
from onnxrep.errors import DataError, InputError
from onnxrep.ir.model import load
from onnxrep.progress import Progress
from onnxrep.runtime import session as runtime_session
from onnxrep.verify import ModelLike, OutputMetrics, output_bounds, run, session
from onnxrep.verify.streaming import Fidelity


@dataclass(frozen=True)
class EvalResult:
    samples: int
    seconds: float
    output: str  # the output scored for accuracy (the model's first)
    accuracy: dict[int, float] = field(default_factory=dict)  # k -> top-k accuracy
    fidelity: dict[str, OutputMetrics] | None = None  # per output, vs the reference
    skipped: tuple[str, ...] = ()  # what was not measured, and why

    @property
    def top1(self) -> float | None:
        return self.accuracy.get(1)

    @property
    def top5(self) -> float | None:
        return self.accuracy.get(5)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf

    def as_dict(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds,
                "samples_per_second": self.samples_per_second, "output": self.output,
                "accuracy": {f"top{k}": v for k, v in self.accuracy.items()},
                "fidelity": None if self.fidelity is None else
                {name: asdict(m) for name, m in self.fidelity.items()},
                "skipped": list(self.skipped)}


def evaluate(model: ModelLike, data, *, reference: ModelLike | None = None,
             batch_size: int | None = None, top_k: tuple[int, ...] = (1, 5),
             runtime: str = "onnxruntime", threads: int = 0) -> EvalResult:
    """Run ``model`` over ``data`` (a :class:`Dataset`, or any source ``load_data`` takes, then
    batched by ``batch_size``) in ``runtime``; score top-k against the data's labels and, with
    ``reference`` (run in onnxruntime), every output's fidelity to it. Neither model is
    modified."""
    proto = model if isinstance(model, onnx.ModelProto) else load(model)
    dataset = as_dataset(data, proto, batch_size=batch_size)
    sess = runtime_session(proto, runtime, threads=threads)
    outputs = sess.output_names
    ref_sess, bounds = (_reference_session(reference, sess) if reference is not None
                        else (None, {}))
    fidelity = ({name: Fidelity(bounds.get(name, 0.0)) for name in outputs}
                if ref_sess is not None else None)
    scorer = _TopK(dataset.labels, top_k) if dataset.labels is not None else None
    done, seconds = 0, 0.0
    with Progress(dataset.num_samples, "evaluating") as bar:
        for feeds in dataset.batches():
            sess.prepare(feeds)  # OpenVINO compiles once per shape: not timed
            start = time.perf_counter()
            out = sess.run_dict(feeds)
            seconds += time.perf_counter() - start
            n = len(next(iter(feeds.values())))
            if scorer is not None:
                scorer.update(out[outputs[0]], done, outputs[0])
            if ref_sess is not None:
                ref = run(ref_sess, feeds)
                for name, acc in fidelity.items():
                    acc.update(ref[name], out[name], name)
            done += n
            running = scorer.running if scorer is not None else None
            bar.update(n, **({} if running is None else {"top1": running}))
    skipped = list(scorer.skipped if scorer else ["accuracy: the data has no labels"])
    if dataset.dropped:
        skipped.append(f"{dataset.dropped} trailing samples: the model's batch size is fixed "
                       f"at {dataset.batch_size}")
    return EvalResult(done, seconds, outputs[0], scorer.result() if scorer else {},
                      {k: v.result() for k, v in fidelity.items()} if fidelity else None,
                      tuple(skipped))


def _reference_session(reference: ModelLike, sess) -> tuple[object, dict[str, float]]:
    """The reference's session and its output bounds, after checking it fits the model."""
    proto = reference if isinstance(reference, onnx.ModelProto) else load(reference)
    ref = session(proto, optimized=True)
    want = sorted(sess.input_names)
    have = sorted(i.name for i in ref.get_inputs())
    if want != have:
        raise InputError(f"the reference model's inputs ({', '.join(have)}) differ from the "
                         f"model's ({', '.join(want)})")
    ref_outputs = {o.name for o in ref.get_outputs()}
    missing = [name for name in sess.output_names if name not in ref_outputs]
    if missing:
        raise InputError(f"the reference model has no output {', '.join(missing)}")
    return ref, output_bounds(proto)


class _TopK:
    """Top-k hit counts over batches, against labels indexed by sample position."""

    def __init__(self, labels: np.ndarray, top_k: tuple[int, ...]):
        self.labels, self.top_k = labels, tuple(sorted(set(top_k)))
        self.hits: dict[int, int] | None = None  # decided on the first batch
        self.samples = 0
        self.skipped: list[str] = []

    def update(self, scores: np.ndarray, offset: int, name: str) -> None:
        if self.hits is None:
            self._start(scores, name)
        if not self.hits:
            return
        labels = self.labels[offset:offset + len(scores)]
        order = np.argsort(-scores, axis=1, kind="stable")
        for k in self.hits:
            self.hits[k] += int((order[:, :k] == labels[:, None]).any(axis=1).sum())
        self.samples += len(scores)

    def _start(self, scores: np.ndarray, name: str) -> None:
        self.hits = {}
        if scores.ndim != 2 or scores.shape[1] < 2:
            self.skipped.append(f"accuracy: output '{name}' of shape "
                                f"{'x'.join(map(str, scores.shape))} is not [N, K] class scores")
            return
        classes = scores.shape[1]
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= classes:
            raise DataError(f"labels range {low}..{high} but output '{name}' has {classes} "
                            "classes")
        for k in self.top_k:
            if k > 1 and k >= classes:
                self.skipped.append(f"top-{k}: trivial with {classes} classes")
            else:
                self.hits[k] = 0

    @property
    def running(self) -> float | None:
        """Top-1 so far, for the progress bar."""
        return self.hits[1] / self.samples if self.samples and 1 in self.hits else None

    def result(self) -> dict[int, float]:
        return {k: v / self.samples for k, v in (self.hits or {}).items()} if self.samples else {}
