"""The main job: equivalence-preserving passes that make a deploy-form Rep model quantize well.

Verification runs the model before and after through onnxruntime (graph optimizations off) on
seeded inputs of the model's own shapes, or on the first calibration batch when data is given,
and raises :class:`VerificationError` past ``rtol``. ``optimize`` checks after every pass that
changed the model, so a failure names its pass. ``optimize_file`` is the lean path the CLI
takes for large models: onnxruntime reads the input file and the written result itself, the
result is verified before it is moved into place, no second in-memory copy is made, and
onnxruntime's loading overlaps Python's work.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxrep import verify
from onnxrep.model import atomic_output, check_opset, load, write_to
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
    """What a run did. ``model`` is None after :func:`optimize_file`, which does not keep it."""

    model: onnx.ModelProto | None
    results: list[tuple[str, PassResult]]
    before: list[WeightStats]
    after: list[WeightStats]
    comparison: verify.Comparison | None


def optimize(model: onnx.ModelProto, config: OptimizeConfig | None = None, *,
             calib=None) -> onnx.ModelProto:
    """Return an equivalent model whose weights quantize well per-tensor; ``model`` is untouched.

    ``calib``: a :class:`onnxrep.calibration.readers.Dataset` whose first batch is used for
    verification instead of random inputs."""
    return optimize_with_details(model, config, calib=calib).model


def optimize_with_details(model: onnx.ModelProto, config: OptimizeConfig | None = None, *,
                          calib=None, copy: bool = True, progress=None) -> Optimized:
    """Like :func:`optimize`, also returning per-pass results, weight statistics before and
    after, and the verification comparison. ``copy=False`` optimizes ``model`` in place."""
    config = config or OptimizeConfig()
    check_opset(model)
    work = onnx.ModelProto()
    if copy:
        work.CopyFrom(model)
    else:
        work = model
    feeds = _feeds(work, config, calib) if config.verify else None
    reference = verify.run(work, feeds) if config.verify else None
    comparison = verify.compare_outputs(reference, reference) if config.verify else None

    def check(name: str) -> None:
        nonlocal comparison
        comparison = verify.compare_outputs(reference, verify.run(work, feeds))
        verify.check(comparison, config.rtol, f"pass '{name}'")

    before = weight_stats(work)
    results = _run_passes(work, config, progress, check if config.verify else None)
    return Optimized(work, results, before, weight_stats(work), comparison)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike,
                  config: OptimizeConfig | None = None, *, calib=None, force: bool = False,
                  progress=None) -> Optimized:
    """Optimize the model in ``src`` into ``dst``; nothing is written unless it verifies."""
    config = config or OptimizeConfig()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # onnxruntime reads the input while Python parses it and computes weight statistics
        ref_session = pool.submit(verify.session, Path(src)) if config.verify else None
        model = load(src)
        before = weight_stats(model)
        feeds = reference = comparison = None
        if config.verify:
            feeds = _feeds(model, config, calib)
            reference = verify.run(ref_session.result(), feeds)
            ref_session = None
            verify.release_memory()
        results = _run_passes(model, config, progress, None)
    after = weight_stats(model)
    with atomic_output(dst, force=force) as tmp:
        write_to(model, tmp)
        del model  # onnxruntime reads the written file; the proto's memory goes back first
        verify.release_memory()
        if config.verify:
            comparison = verify.compare_outputs(reference, verify.run(tmp, feeds))
            changed = [name for name, r in results if r.modified]
            verify.check(comparison, config.rtol, f"passes {', '.join(changed) or '(none)'}")
    return Optimized(None, results, before, after, comparison)


def _passes(config: OptimizeConfig) -> list[Pass]:
    return [EqualizeCrossLayer(config.equalize)]


def _run_passes(model: onnx.ModelProto, config: OptimizeConfig, progress, check
                ) -> list[tuple[str, PassResult]]:
    results = []
    for p in _passes(config):
        if progress:
            progress(f"{p.name}...")
        result = p(model)
        results.append((p.name, result))
        if check and result.modified:
            check(p.name)
    return results


def _feeds(model: onnx.ModelProto, config: OptimizeConfig, calib) -> dict:
    if calib is not None:
        return calib.first_batch()
    return verify.random_inputs(model, config.input_shapes, seed=config.seed)
