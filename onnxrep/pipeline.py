"""The main job: passes that make a deploy-form Rep model quantize well, each one verified.

Pipeline: merge train-form Rep blocks (parallel branches of one tensor) into one Conv each ->
fold per-channel affine ops (BatchNormalization, Mul/Add/Sub/Div by a constant) into
the layer before them -> zero dead inputs -> cross-layer equalization -> high-bias
absorption. Merging, folding and CLE are EQUIVALENT. Dead-input cleanup runs with calibration data
(channels observed dead) or a stated ``input_range`` (channels proven dead by interval
arithmetic); absorption needs calibration data. Those two are EQUIVALENT_ON_DATA: the function
is unchanged wherever their statistics or bounds hold.

Verification runs the model before and after through onnxruntime (graph optimizations off) on
seeded inputs of the model's own shapes (uniform in ``input_range`` when one is given), or on
the first calibration batch when data is given, and raises :class:`VerificationError` past
``rtol``; once a data-dependent pass changed the model, the result is also compared with the
original over all of the calibration data (the original's outputs for as many batches as
``RECORDED_BYTES`` hold come from the first statistics run, which computes them anyway).
``optimize`` checks after every pass that changed the model, so a failure names its pass.
``optimize_file`` is the lean path the CLI takes for large models: onnxruntime reads the input
file and the written result itself, the result is verified before it is moved into place, no
second in-memory copy is made, and onnxruntime's loading overlaps Python's work.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxrep import verify
from onnxrep.errors import VerificationError
from onnxrep.analysis.statistics import Statistics, collect_statistics
from onnxrep.analysis.weights import WeightStats, weight_stats
from onnxrep.data import as_dataset
from onnxrep.ir.graph import GraphIndex, subgraph_layers
from onnxrep.ir.model import atomic_output, check_input_file, check_opset, load, write_to
from onnxrep.passes.absorb_bias import AbsorbHighBias
from onnxrep.passes.base import PassManager, PassResult, Stage, StatisticsCache, Verifier
from onnxrep.passes.dead_inputs import ZeroDeadInputs, input_bounds_from_stats, zero_below
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.passes.fold_affine import FoldAffine
from onnxrep.passes.reparameterize import Reparameterize, find_blocks
from onnxrep.passes.restore_bn import RestoreBatchNorm, select_convs
from onnxrep.verify.streaming import DataCheck, compare_on_data


# Graph outputs the first statistics run keeps as the reference of the check over the data (that
# check then runs only the optimized model on the batches they cover).
RECORDED_BYTES = 256 * 2**20


@dataclass(frozen=True)
class OptimizeConfig:
    """``rtol``: largest relative output error accepted (max |a - b| / max |reference|);
    ``input_shapes``: concrete shapes for symbolic inputs, e.g. ``{"input": (1, 3, 224, 224)}``;
    ``strict``: abort when a pass fails its check instead of rolling back the units that
    break it; ``reparameterize`` (train-form blocks), ``fold_bn`` (BatchNormalization and the other
    per-channel affine ops), ``dead_inputs``, ``absorb_bias``: switch those passes (absorption needs calibration data);
    ``input_range``: (lo, hi) bounding every float input, which proves dead channels without
    data and bounds the random verification inputs; ``batch_size`` and ``calib_limit``: how
    ``calib`` is read when it is not already a Dataset."""

    equalize: EqualizeConfig = field(default_factory=EqualizeConfig)
    verify: bool = True
    rtol: float = 1e-4
    input_shapes: dict | None = None
    seed: int = 0
    strict: bool = False
    reparameterize: bool = True
    fold_bn: bool = True
    dead_inputs: bool = True
    absorb_bias: bool = True
    input_range: tuple[float, float] | None = None
    batch_size: int | None = None
    calib_limit: int | None = None

    def __post_init__(self):
        if self.input_range is not None:
            lo, hi = self.input_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"input range must be finite with lo < hi, not {lo}, {hi}")
        if (self.batch_size is not None and self.batch_size < 1) or (self.calib_limit is not None and self.calib_limit < 1):
            raise ValueError("batch size and calibration limit must be at least 1")


@dataclass
class Optimized:
    """What a run did. ``model`` is None after :func:`optimize_file`, which does not keep it.
    ``comparison``: on the verification inputs; ``data_comparison``: the result against the
    original over all calibration samples, when a data-dependent pass changed the model.
    ``folded``: weight statistics of the deploy form, the model after reparameterization and
    BN/affine folding (which every INT8 flow does: onnxruntime's quantization pre-processing,
    OpenVINO and TensorRT fold BN too), before the passes that move precision between layers;
    None when neither pass changed the model."""

    model: onnx.ModelProto | None
    results: list[tuple[str, PassResult]]
    before: list[WeightStats]
    after: list[WeightStats]
    comparison: verify.Comparison | None
    data_comparison: verify.Comparison | None = None
    subgraph_layers: list[tuple[str, str]] = field(default_factory=list)  # (layer, where): left alone
    data_check: DataCheck | None = None  # the check over the data left to the caller (defer)
    folded: list[WeightStats] | None = None  # after reparameterize + fold-affine, if they ran


@dataclass
class Restored:
    """What :func:`restore_bn_with_details` did."""

    model: onnx.ModelProto
    result: PassResult
    stats: Statistics
    comparison: object | None  # verify.Comparison on the calibration data


def optimize(model: onnx.ModelProto, config: OptimizeConfig | None = None,
             calib=None) -> onnx.ModelProto:
    """Return a model whose weights quantize well per-tensor; ``model`` is untouched.

    ``calib``: calibration data (a :class:`onnxrep.data.Dataset` or anything
    ``load_data`` takes). Without it the result is equivalent to ``model``; with it, dead
    channels and high biases are measured too and the result equals ``model`` on that data."""
    return optimize_with_details(model, config, calib=calib).model


def optimize_with_details(model: onnx.ModelProto, config: OptimizeConfig | None = None, *,
                          calib=None, copy: bool = True, progress=None,
                          check_each: bool = True, defer_data_check: bool = False) -> Optimized:
    """Like :func:`optimize`, also returning per-pass results, weight statistics before and
    after, and the verification comparisons. ``copy=False`` optimizes ``model`` in place; a
    copy is then made only when the result will be compared with it on calibration data.
    ``check_each=False`` verifies the result once, by the contracts of every pass that changed
    it (one run over the data instead of one per data-dependent pass; a failure then names the
    passes, not the one). With it, ``defer_data_check`` checks the verification inputs only and
    returns the check over the data as ``Optimized.data_check`` (None when none is needed), for
    a caller that runs the result over the data anyway (``quantize``'s calibration) to feed; if
    that check fails, the caller optimizes again with ``check_each`` to roll back."""
    config = config or OptimizeConfig()
    check_opset(model)
    verify.check_weights(model)
    dataset = _dataset(calib, model, config)
    replay = dataset is not None and _replayable(dataset)
    work, original = model, model
    # a copy of the input stays when the result is compared with it over the data, or when a
    # check made once at the end may have to be redone pass by pass (to roll units back)
    if copy or (config.verify and (replay or (not check_each and not config.strict))):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        if not copy:
            work, original = model, work
    verifier = None
    if config.verify:
        verifier = Verifier(original, _feeds(work, config, dataset),
                            rtol=verify.effective_rtol(work, config.rtol),
                            bounds=verify.output_bounds(work),
                            dataset=dataset if replay else None)
    before, folded = weight_stats(work), []
    manager = _manager(work, config, dataset, progress, verifier, check_each=check_each,
                       folded=folded)
    run = manager.run(work)
    pending = None
    if verifier is not None and not check_each and run.changed:
        try:
            pending = manager.verify_result(run, work, defer=defer_data_check)
        except VerificationError:
            if config.strict:
                raise
            work.CopyFrom(original)  # again, pass by pass, rolling back what breaks
            run = _manager(work, config, dataset, progress, verifier, check_each=True,
                           folded=folded).run(work)
    comparison = run.comparison
    if verifier is not None and comparison is None:  # nothing changed: exact
        comparison = verify.compare_outputs(verifier.reference, verifier.reference)
    return Optimized(work, run.results, before, weight_stats(work), comparison,
                     run.data_comparison, subgraph_layers(work.graph), pending, folded or None)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike,
                  config: OptimizeConfig | None = None, *, calib=None, force: bool = False,
                  progress=None) -> Optimized:
    """Optimize the model in ``src`` into ``dst``; nothing is written unless it verifies.
    The lean driver for large models: onnxruntime reads the input file and the written result
    itself, the result is verified once before it is moved into place, and no second
    in-memory copy is made."""
    config = config or OptimizeConfig()
    check_input_file(src, "an .onnx file")  # before onnxruntime opens it (a FIFO would hang)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # onnxruntime reads the input while Python parses it and computes weight statistics
        ref_session = pool.submit(verify.session, Path(src)) if config.verify else None
        model = load(src)
        verify.check_weights(model)
        dataset = _dataset(calib, model, config)
        before = weight_stats(model)
        verifier = None
        if config.verify:
            feeds = _feeds(model, config, dataset)
            replay = dataset is not None and _replayable(dataset)
            verifier = Verifier(Path(src), feeds, rtol=verify.effective_rtol(model, config.rtol),
                                bounds=verify.output_bounds(model),
                                dataset=dataset if replay else None,
                                reference=verify.run(ref_session.result(), feeds))
            ref_session = None
            verify.release_memory()
        folded: list[WeightStats] = []
        manager = _manager(model, config, dataset, progress, verifier, check_each=False,
                           folded=folded)
        run = manager.run(model)
    after = weight_stats(model)
    nested = subgraph_layers(model.graph)
    # the results keep what the passes did, not the model: the proto's memory (its arena holds
    # every weight the passes replaced, too) goes back before onnxruntime reads the written file
    run.results = [(name, replace(result, model=None)) for name, result in run.results]
    with atomic_output(dst, force=force) as tmp:
        write_to(model, tmp)
        del model
        verify.release_memory()
        if verifier is not None:
            try:
                manager.verify_result(run, tmp)
            except VerificationError:
                if config.strict:
                    raise
                # again in memory, pass by pass, rolling back the units that break the check
                again = optimize_with_details(load(src), config, calib=dataset, copy=False,
                                              progress=progress)
                write_to(again.model, tmp)
                return Optimized(None, again.results, before, again.after, again.comparison,
                                 again.data_comparison, nested, folded=again.folded)
    return Optimized(None, run.results, before, after, run.comparison, run.data_comparison,
                     nested, folded=folded or None)


def restore_bn(model: onnx.ModelProto, calib, layers: list[str] | None = None,
               eps: float = 1e-5) -> onnx.ModelProto:
    """A copy of ``model`` with a BN after each selected Conv, its mean/var measured on
    ``calib`` (a Dataset or anything ``load_data`` takes); verified on that data."""
    return restore_bn_with_details(model, calib, layers, eps).model


def restore_bn_with_details(model: onnx.ModelProto, calib, layers: list[str] | None = None,
                            eps: float = 1e-5, *, rtol: float = 1e-5, verify: bool = True,
                            batch_size: int | None = None, workers: int = 1) -> Restored:
    """Like :func:`restore_bn`; also returns the pass result, the statistics and the
    comparison of both models over all of the calibration data (:class:`VerificationError`
    past ``rtol``, relative to the largest output magnitude). The BN is an identity for every
    input, but its statistics come from the data, so the check runs over all of it."""
    check_opset(model)
    dataset = as_dataset(calib, model, batch_size=batch_size)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    index = GraphIndex(work.graph)
    tensors = [index.node(i).output[0] for i in select_convs(work, layers, index)]
    stats = collect_statistics(work, dataset, tensors, workers=workers)
    result = RestoreBatchNorm(stats, layers, eps)(work)
    comparison = None
    if verify:
        comparison = compare_on_data(model, work, dataset, rtol=rtol, what="restore-bn")
    return Restored(work, result, stats, comparison)


def _manager(model: onnx.ModelProto, config: OptimizeConfig, dataset, progress,
             verifier: Verifier | None, *, check_each: bool,
             folded: list | None = None) -> PassManager:
    """The optimize pipeline in order; each stage sees the model as the earlier passes left
    it. fold-affine runs when there is something it could fold; the data-dependent passes
    run when the data can be read more than once (statistics, then verification).
    ``folded``: filled with the weight statistics of the deploy form (see :class:`Optimized`)."""
    if dataset is not None and not _replayable(dataset):
        dataset = None
    checked = verifier is not None and verifier.dataset is not None
    stats = (StatisticsCache(dataset, keep_outputs=RECORDED_BYTES if checked else 0)
             if dataset is not None else None)
    stages = []
    if config.reparameterize and any(b.reason is None for b in find_blocks(model)):
        stages.append(Stage("reparameterize", lambda m, s: Reparameterize()))
    if config.fold_bn and any(n.op_type in FoldAffine.ops for n in model.graph.node):
        stages.append(Stage("fold-affine", lambda m, s: FoldAffine()))
    if config.dead_inputs and (dataset is not None or config.input_range is not None):
        stages.append(Stage("dead-inputs", lambda m, s: _dead_inputs(m, config, s)))
    stages.append(Stage("equalize", lambda m, s: EqualizeCrossLayer(config.equalize)))
    if config.absorb_bias and dataset is not None:
        stages.append(Stage("absorb-bias", lambda m, s: AbsorbHighBias(
            s.get(m, relu_inputs(m)))))
    def observe(name: str, result: PassResult, m: onnx.ModelProto) -> None:
        if folded is not None and name in DEPLOY_FORM and result.modified:
            folded[:] = weight_stats(m)

    return PassManager(stages, verifier=verifier, stats=stats, check_each=check_each,
                       strict=config.strict, progress=progress, observe=observe)


DEPLOY_FORM = ("reparameterize", "fold-affine")  # what every INT8 flow does first


def _dead_inputs(model: onnx.ModelProto, config: OptimizeConfig,
                 stats: StatisticsCache | None) -> ZeroDeadInputs:
    if stats is None:
        return ZeroDeadInputs(None, config.input_range)
    inputs = [s.name for s in verify.input_specs(model)]
    measured = stats.get(model, relu_inputs(model) + inputs)
    return ZeroDeadInputs(measured, config.input_range or input_bounds_from_stats(model, measured))


def relu_inputs(model: onnx.ModelProto) -> list[str]:
    """Inputs of every ReLU (and ReLU6 Clip): the pre-activations dead-input cleanup and
    absorption measure."""
    index = GraphIndex(model.graph)
    return list(dict.fromkeys(n.input[0] for n in model.graph.node if zero_below(index, n)))


def _dataset(calib, model: onnx.ModelProto, config: OptimizeConfig):
    if calib is None:
        return None
    return as_dataset(calib, model, batch_size=config.batch_size, limit=config.calib_limit)


def _replayable(dataset) -> bool:
    """Whether the data can be read more than once (a generator cannot: then only its first
    batch is used, for verification, and the data-dependent passes do not run)."""
    return bool(getattr(dataset, "replayable", True))


def _feeds(model: onnx.ModelProto, config: OptimizeConfig, dataset) -> dict:
    if dataset is not None:
        return dataset.first_batch()
    feeds = verify.random_inputs(model, config.input_shapes, seed=config.seed)
    if config.input_range is not None:  # proven deadness holds only inside the range
        rng = np.random.default_rng(config.seed)
        lo, hi = config.input_range
        feeds = {k: rng.uniform(lo, hi, v.shape).astype(v.dtype)
                 if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}
    return feeds
