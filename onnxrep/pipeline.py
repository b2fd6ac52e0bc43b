"""The main job: passes that make a deploy-form Rep model quantize well, each one verified.

Pipeline: fold per-channel affine ops (BatchNormalization, Mul/Add/Sub/Div by a constant) into
the layer before them -> zero dead inputs -> cross-layer equalization -> high-bias
absorption. Folding and CLE are EQUIVALENT. Dead-input cleanup runs with calibration data
(channels observed dead) or a stated ``input_range`` (channels proven dead by interval
arithmetic); absorption needs calibration data. Those two are EQUIVALENT_ON_DATA: the function
is unchanged wherever their statistics or bounds hold.

Verification runs the model before and after through onnxruntime (graph optimizations off) on
seeded inputs of the model's own shapes (uniform in ``input_range`` when one is given), or on
the first calibration batch when data is given, and raises :class:`VerificationError` past
``rtol``; once a data-dependent pass changed the model, the result is also compared with the
original over all of the calibration data. ``optimize`` checks after every pass that changed
the model, so a failure names its pass. ``optimize_file`` is the lean path the CLI takes for
large models: onnxruntime reads the input file and the written result itself, the result is
verified before it is moved into place, no second in-memory copy is made, and onnxruntime's
loading overlaps Python's work.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from onnxrep import verify
from onnxrep.data import as_dataset
from onnxrep.analysis.statistics import collect_statistics
from onnxrep.verify import compare_on_data
from onnxrep.ir.graph import GraphIndex
from onnxrep.ir.model import atomic_output, check_opset, load, write_to
from onnxrep.passes.absorb_bias import AbsorbHighBias
from onnxrep.passes.base import Contract, Pass, PassResult
from onnxrep.passes.dead_inputs import ZeroDeadInputs, input_bounds_from_stats, zero_below
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.passes.fold_affine import FoldAffine
from onnxrep.analysis.weights import WeightStats, weight_stats


@dataclass(frozen=True)
class OptimizeConfig:
    """``rtol``: largest relative output error accepted (max |a - b| / max |reference|);
    ``input_shapes``: concrete shapes for symbolic inputs, e.g. ``{"input": (1, 3, 224, 224)}``;
    ``fold_bn`` (BatchNormalization and the other per-channel affine ops), ``dead_inputs``,
    ``absorb_bias``: switch those passes (absorption needs calibration data);
    ``input_range``: (lo, hi) bounding every float input, which proves dead channels without
    data and bounds the random verification inputs; ``batch_size`` and ``calib_limit``: how
    ``calib`` is read when it is not already a Dataset."""

    equalize: EqualizeConfig = field(default_factory=EqualizeConfig)
    verify: bool = True
    rtol: float = 1e-4
    input_shapes: dict | None = None
    seed: int = 0
    fold_bn: bool = True
    dead_inputs: bool = True
    absorb_bias: bool = True
    input_range: tuple[float, float] | None = None
    batch_size: int = 32
    calib_limit: int | None = None

    def __post_init__(self):
        if self.input_range is not None:
            lo, hi = self.input_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"input range must be finite with lo < hi, not {lo}, {hi}")
        if self.batch_size < 1 or (self.calib_limit is not None and self.calib_limit < 1):
            raise ValueError("batch size and calibration limit must be at least 1")


@dataclass
class Optimized:
    """What a run did. ``model`` is None after :func:`optimize_file`, which does not keep it.
    ``comparison``: on the verification inputs; ``data_comparison``: the result against the
    original over all calibration samples, when a data-dependent pass changed the model."""

    model: onnx.ModelProto | None
    results: list[tuple[str, PassResult]]
    before: list[WeightStats]
    after: list[WeightStats]
    comparison: verify.Comparison | None
    data_comparison: verify.Comparison | None = None


def optimize(model: onnx.ModelProto, config: OptimizeConfig | None = None,
             calib=None) -> onnx.ModelProto:
    """Return a model whose weights quantize well per-tensor; ``model`` is untouched.

    ``calib``: calibration data (a :class:`onnxrep.calibration.readers.Dataset` or anything
    ``load_data`` takes). Without it the result is equivalent to ``model``; with it, dead
    channels and high biases are measured too and the result equals ``model`` on that data."""
    return optimize_with_details(model, config, calib=calib).model


def optimize_with_details(model: onnx.ModelProto, config: OptimizeConfig | None = None, *,
                          calib=None, copy: bool = True, progress=None) -> Optimized:
    """Like :func:`optimize`, also returning per-pass results, weight statistics before and
    after, and the verification comparisons. ``copy=False`` optimizes ``model`` in place; a
    copy is then made only when the result will be compared with it on calibration data."""
    config = config or OptimizeConfig()
    check_opset(model)
    dataset = _dataset(calib, model, config)
    replay = dataset is not None and _replayable(dataset)
    work, original = model, model
    if copy or (config.verify and replay):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        if not copy:
            work, original = model, work
    feeds = _feeds(work, config, dataset) if config.verify else None
    reference = verify.run(work, feeds) if config.verify else None
    bounds = verify.output_bounds(work)
    comparison = verify.compare_outputs(reference, reference) if config.verify else None
    data_comparison, stale = None, False

    def check(p: Pass) -> None:
        nonlocal comparison, data_comparison, stale
        comparison = verify.compare_outputs(reference, verify.run(work, feeds), bounds)
        verify.check(comparison, config.rtol, f"pass '{p.name}'")
        stale = stale or data_comparison is not None
        if p.contract is Contract.EQUIVALENT_ON_DATA and replay:
            data_comparison = compare_on_data(original, work, dataset, rtol=config.rtol,
                                              what=f"pass '{p.name}'")
            stale = False

    before = weight_stats(work)
    results, _ = _run_passes(work, config, dataset, progress, check if config.verify else None)
    if stale:
        data_comparison = compare_on_data(original, work, dataset, rtol=config.rtol,
                                          what="the passes")
    return Optimized(work, results, before, weight_stats(work), comparison, data_comparison)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike,
                  config: OptimizeConfig | None = None, *, calib=None, force: bool = False,
                  progress=None) -> Optimized:
    """Optimize the model in ``src`` into ``dst``; nothing is written unless it verifies."""
    config = config or OptimizeConfig()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # onnxruntime reads the input while Python parses it and computes weight statistics
        ref_session = pool.submit(verify.session, Path(src)) if config.verify else None
        model = load(src)
        dataset = _dataset(calib, model, config)
        before = weight_stats(model)
        bounds = verify.output_bounds(model)
        feeds = reference = comparison = data_comparison = None
        if config.verify:
            feeds = _feeds(model, config, dataset)
            reference = verify.run(ref_session.result(), feeds)
            ref_session = None
            verify.release_memory()
        results, on_data = _run_passes(model, config, dataset, progress, None)
    after = weight_stats(model)
    with atomic_output(dst, force=force) as tmp:
        write_to(model, tmp)
        del model  # onnxruntime reads the written file; the proto's memory goes back first
        verify.release_memory()
        if config.verify:
            comparison = verify.compare_outputs(reference, verify.run(tmp, feeds), bounds)
            changed = [name for name, r in results if r.modified]
            verify.check(comparison, config.rtol, f"passes {', '.join(changed) or '(none)'}")
            if on_data and dataset is not None and _replayable(dataset):
                data_comparison = compare_on_data(Path(src), tmp, dataset, rtol=config.rtol,
                                                  what=f"passes {', '.join(changed)}")
    return Optimized(None, results, before, after, comparison, data_comparison)


def _stages(model: onnx.ModelProto, config: OptimizeConfig, dataset
            ) -> list[tuple[str, Callable[[onnx.ModelProto], Pass]]]:
    """(name, pass factory) in pipeline order; a factory sees the model as the earlier
    passes left it (statistics are measured on that model). fold-affine runs when there is
    something it could fold."""
    stages: list[tuple[str, Callable[[onnx.ModelProto], Pass]]] = []
    if dataset is not None and not _replayable(dataset):
        dataset = None
    if config.fold_bn and any(n.op_type in FoldAffine.ops for n in model.graph.node):
        stages.append(("fold-affine", lambda m: FoldAffine()))
    if config.dead_inputs and (dataset is not None or config.input_range is not None):
        stages.append(("dead-inputs", lambda m: _dead_inputs(m, config, dataset)))
    stages.append(("equalize", lambda m: EqualizeCrossLayer(config.equalize)))
    if config.absorb_bias and dataset is not None:
        stages.append(("absorb-bias", lambda m: AbsorbHighBias(
            collect_statistics(m, dataset, relu_inputs(m)))))
    return stages


def _dead_inputs(model: onnx.ModelProto, config: OptimizeConfig, dataset) -> ZeroDeadInputs:
    if dataset is None:
        return ZeroDeadInputs(None, config.input_range)
    inputs = [s.name for s in verify.input_specs(model)]
    stats = collect_statistics(model, dataset, relu_inputs(model) + inputs)
    return ZeroDeadInputs(stats, config.input_range or input_bounds_from_stats(model, stats))


def relu_inputs(model: onnx.ModelProto) -> list[str]:
    """Inputs of every ReLU (and ReLU6 Clip): the pre-activations dead-input cleanup and
    absorption measure."""
    index = GraphIndex(model.graph)
    return list(dict.fromkeys(n.input[0] for n in model.graph.node if zero_below(index, n)))


def _run_passes(model: onnx.ModelProto, config: OptimizeConfig, dataset, progress, check
                ) -> tuple[list[tuple[str, PassResult]], list[str]]:
    """(name, result) per pass in order, and the names of the passes that changed the model
    under the equivalent-on-data contract (to be checked on the calibration data)."""
    results, on_data = [], []
    for name, make in _stages(model, config, dataset):
        if progress:
            progress(f"{name}...")
        p = make(model)
        result = p(model)
        results.append((p.name, result))
        if result.modified and p.contract is Contract.EQUIVALENT_ON_DATA:
            on_data.append(p.name)
        if check and result.modified:
            check(p)
    return results, on_data


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
