"""The main job: equivalence-preserving passes that make a deploy-form Rep model quantize well.

``optimize`` copies its input once, runs the passes on the copy and, with verification on,
runs the model before and after every pass through onnxruntime (graph optimizations off,
seeded inputs of the model's own shapes) and raises :class:`VerificationError` past ``rtol``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxrep import verify
from onnxrep.model import check_opset
from onnxrep.passes.base import Pass, PassResult
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.report import WeightStats, weight_stats


@dataclass(frozen=True)
class OptimizeConfig:
    """``rtol``: largest relative output error accepted (max |a - b| / max |reference|);
    ``input_shapes``: concrete shapes for symbolic inputs, e.g. ``{"input": (1, 3, 224, 224)}``."""

    equalize: EqualizeConfig = field(default_factory=EqualizeConfig)
    verify: bool = True
    rtol: float = 1e-4
    input_shapes: dict | None = None
    seed: int = 0


@dataclass
class Optimized:
    model: onnx.ModelProto
    results: list[tuple[str, PassResult]]
    before: list[WeightStats]
    after: list[WeightStats]
    comparison: verify.Comparison | None


def optimize(model: onnx.ModelProto, config: OptimizeConfig | None = None) -> onnx.ModelProto:
    """Return an equivalent model whose weights quantize well per-tensor; ``model`` is untouched."""
    return optimize_with_details(model, config).model


def optimize_with_details(model: onnx.ModelProto, config: OptimizeConfig | None = None, *,
                          copy: bool = True, progress=None) -> Optimized:
    """Like :func:`optimize`, also returning per-pass results, weight statistics before and
    after, and the verification comparison. ``copy=False`` optimizes ``model`` in place."""
    config = config or OptimizeConfig()
    check_opset(model)
    if copy:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = model
    passes: list[Pass] = [EqualizeCrossLayer(config.equalize)]
    before = weight_stats(work)
    feeds = reference = None
    if config.verify:
        feeds = verify.random_inputs(work, config.input_shapes, seed=config.seed)
        reference = verify.run(work, feeds)
    results, comparison = [], None
    for p in passes:
        if progress:
            progress(f"{p.name}...")
        result = p(work)
        results.append((p.name, result))
        if config.verify and result.modified:
            comparison = verify.compare_outputs(reference, verify.run(work, feeds))
            verify.check(comparison, config.rtol, f"pass '{p.name}'")
    if config.verify and comparison is None:
        comparison = verify.compare_outputs(reference, reference)
    return Optimized(work, results, before, weight_stats(work), comparison)
