"""Post-training static quantization to QDQ through onnxruntime, prepared by onnxrep.

``quantize(model, calib, config)``: copy -> onnxrep's optimize passes (CLE, ...) ->
:func:`prepare` (Constant-node weights become initializers, so onnxruntime quantizes them as
weights and not as activations; every node gets a unique name; per-channel raises the opset to
13, below which onnxruntime writes an invalid per-channel model) -> streaming calibration ->
[automatic exclusion from the sensitivity report] -> [bias correction] -> ``quantize_static`` in
QDQ format with the calibrated ranges.

Calibration streams the data through onnxruntime's calibrator ``calibration_chunk`` batches per
``collect_data`` call. MinMax keeps a running min/max per tensor. Entropy and percentile keep one
histogram per tensor, but onnxruntime's histogram calibrator holds every intermediate output of
a ``collect_data`` call until the call ends (onnxruntime issues 10503, 21979); one call per chunk
bounds the peak at ``calibration_chunk x batch x`` one sample's activations, whatever the number
of samples. Histograms are merged across chunks (bins widen as ranges grow), so chunking can move
an entropy threshold by a bin. The ranges reach ``quantize_static`` through its calibration cache
(``calibration_cache_path``), so one calibration serves bias correction, the sensitivity report
and every re-quantization with other excluded nodes.

Types: uint8 activations with int8 weights, onnxruntime's recommendation for x86; on this
project's AVX2 machine (no VNNI) onnxruntime's u8s8 GEMM ran at 1.1x its FP32 GEMM and s8s8 at
0.5x, so uint8 activations stay the default. ReLU/Clip after a Conv are folded into the Conv's
output quantization, so onnxruntime fuses DQ -> Conv -> Q into an integer QLinearConv.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxrep.data import Dataset, as_dataset
from onnxrep.errors import (DataError, InputError, OnnxrepError, UnsupportedModelError,
                            VerificationError)
from onnxrep.ir.graph import remove_unused_constants, unique_name
from onnxrep.ir.model import check_opset, opset_version, write_to
from onnxrep.pipeline import OptimizeConfig, optimize_with_details
from onnxrep.passes.fold_affine import FoldAffine
from onnxrep.progress import Progress, log
from onnxrep.ptq import bias_correction, mixed_precision, sensitivity
from onnxrep.ptq import op_types as op_search, ranges as range_search
from onnxrep.ptq.targets import TARGETS, Target, get_target
from onnxrep.verify.streaming import DataCheck, compare_on_data

if TYPE_CHECKING:
    from onnxrep.training.adaround import Rounding

class Method(str, enum.Enum):
    """Calibration method: onnxruntime's MinMax, Entropy and Percentile, or ``auto``: each
    tensor's range chosen by its consumers' error (:mod:`onnxrep.ptq.ranges`)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    AUTO = "auto"


class QType(str, enum.Enum):
    """8-bit integer type of activations or weights."""

    UINT8 = "uint8"
    INT8 = "int8"


METHODS = tuple(m.value for m in Method)
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
ROUNDINGS = ("nearest", "learned", "block")
LEARNED_ROUNDINGS = ("learned", "block")
PER_CHANNEL_MIN_OPSET = 13
# The FP32 passes before quantization may move outputs by this much relative to their largest
# magnitude: a tenth of one uint8 step over the output's range (1/255), so the passes' error
# stays an order of magnitude below the quantization noise that follows.
PASSES_RTOL = 4e-4
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    ``method``: calibration, "minmax" | "entropy" | "percentile" (``percentile`` keeps that
    share of |x|). ``activation_type``/``weight_type``: "uint8" | "int8". ``optimize``: run
    onnxrep's equivalence-preserving passes first (``passes`` configures them).
    ``exclude``: node names kept in FP32. ``method="auto"``: per-tensor ranges chosen by the
    consumers' error (:mod:`onnxrep.ptq.ranges`). ``auto_exclude``: also keep the K nodes with the
    lowest local SQNR in FP32. ``max_drop``: with evaluation data, give nodes a higher precision
    (worst first, at most ``max_auto_exclude``) until top-1 is within this many points of FP32;
    ``min_sqnr``: the same until the output SQNR vs FP32 on the analysis samples reaches this
    many dB (no labels); ``fallback``: the precisions tried per node, in order ("int16" QDQ,
    "fp32"; default the target's: int16 then fp32 for onnxruntime, fp32 elsewhere;
    :mod:`onnxrep.ptq.mixed_precision`). ``op_search``: also quantize the op types of
    :data:`onnxrep.ptq.op_types.CANDIDATES` the model has, each only if it does not lower the
    output SQNR on the analysis samples (:mod:`onnxrep.ptq.op_types`).
    ``bias_correction``: empirical per-channel bias correction (bias_correction.py); on by
    default because it helped every shipped model (logit SQNR vs FP32 on the 10k test set,
    per-tensor / per-channel: MobileOne +4.2 / +2.1 dB, RepVGG +2.8 / +2.0 dB).
    ``calibration_chunk``: batches per calibrator call (bounds histogram memory).
    ``analysis_samples``: calibration samples kept for bias correction and the report (None: as
    many as hold 2^21 input values, 8 to 256; :func:`analysis_limit`).
    ``rounding``: "nearest" (onnxruntime's) or "learned" (AdaRound after bias correction,
    :mod:`onnxrep.training.adaround`; needs torch, kept only when it raises the output SQNR on
    held-out calibration samples) or "block" (the same with two-layer blocks, a layer, its
    activation and the next layer, learned together: BRECQ, :mod:`onnxrep.training.brecq`).
    ``rounding_samples``: calibration samples learned rounding
    learns and chooses on (None: :func:`rounding_limit`; never fewer than the analysis
    samples, which bias correction keeps using). ``op_types``: op types onnxruntime quantizes.
    ``target``: the runtime the model is for
    (:mod:`onnxrep.ptq.targets`: "onnxruntime", "openvino", "tensorrt"); ``per_channel``, the
    types and ``op_types`` default to the target's (None), and its QDQ placement and
    post-processing apply.
    """

    per_channel: bool | None = None
    method: Method = Method.MINMAX
    activation_type: QType | None = None
    weight_type: QType | None = None
    optimize: bool = True
    passes: OptimizeConfig = field(default_factory=lambda: OptimizeConfig(rtol=PASSES_RTOL))
    exclude: tuple[str, ...] = ()
    auto_exclude: int = 0
    max_drop: float | None = None
    min_sqnr: float | None = None
    fallback: tuple[str, ...] | None = None
    max_auto_exclude: int = 8
    op_search: bool = False
    bias_correction: bool = True
    report: bool = False
    percentile: float = 99.999
    calibration_chunk: int = 4
    analysis_samples: int | None = None
    op_types: tuple[str, ...] | None = None
    target: str | Target = "onnxruntime"
    rounding: str = "nearest"
    rounding_samples: int | None = None

    def __post_init__(self):
        if not isinstance(self.target, Target) and self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        profile = self.profile
        for name in ("per_channel", "activation_type", "weight_type", "op_types"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(profile, name))
        object.__setattr__(self, "fallback", tuple(
            mixed_precision.default_fallback(profile) if self.fallback is None
            else self.fallback))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        problems = []
        for name, kind in (("method", Method), ("activation_type", QType),
                           ("weight_type", QType)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                problems.append(f"{name} must be one of {', '.join(k.value for k in kind)}, "
                                f"not {getattr(self, name)!r}")
        if self.auto_exclude < 0 or self.max_auto_exclude < 0:
            problems.append("auto_exclude and max_auto_exclude must be >= 0")
        if self.max_drop is not None and not (math.isfinite(self.max_drop)
                                              and self.max_drop >= 0):
            problems.append(f"max_drop must be a number of points >= 0, not {self.max_drop}")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            problems.append(f"min_sqnr must be a finite number of dB, not {self.min_sqnr}")
        problems += mixed_precision.fallback_problems(self.fallback, profile)
        if not 0 < self.percentile <= 100:
            problems.append(f"percentile must be in (0, 100], not {self.percentile}")
        if self.max_drop is not None and self.min_sqnr is not None:
            problems.append("give max_drop or min_sqnr, not both")
        if self.calibration_chunk < 1 or any(n is not None and n < 1 for n in (
                self.analysis_samples, self.rounding_samples)):
            problems.append("calibration_chunk, analysis_samples and rounding_samples must "
                            "be >= 1")
        if self.rounding not in ROUNDINGS:
            problems.append(f"rounding must be one of {', '.join(ROUNDINGS)}, "
                            f"not {self.rounding!r}")
        if not self.op_types:
            problems.append("op_types must name at least one op type")
        if profile.activation_symmetric and QType.UINT8 in (self.activation_type,
                                                            self.weight_type):
            problems.append(f"target {profile.name} needs int8 activations and weights")
        if any(not isinstance(n, str) or not n for n in self.exclude):
            problems.append("exclude must hold node names")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def profile(self) -> Target:
        """The deployment target's settings (:class:`onnxrep.ptq.targets.Target`)."""
        return get_target(self.target)


@dataclass
class CalibrationInfo:
    method: str
    samples: int
    batches: int
    tensors: int
    seconds: float


@dataclass
class Quantized:
    """The QDQ model and how it was made. ``float_model`` is the prepared FP32 model that was
    quantized (optimized, Constant weights lifted, bias-corrected when asked). ``stages``:
    seconds per stage (optimize, prepare, calibration, report, bias correction, quantize_static
    = onnxruntime writing QDQ models, max-drop evaluation), in the order they first ran."""

    model: onnx.ModelProto
    float_model: onnx.ModelProto
    config: QuantizeConfig
    excluded: tuple[str, ...]
    notes: list[str]
    calibration: CalibrationInfo
    bias: bias_correction.BiasCorrection | None = None
    report: sensitivity.LayerReport | None = None
    precision: mixed_precision.MixedPrecision | None = None  # max_drop / min_sqnr's record
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    rounding: "Rounding | None" = None  # learned rounding's record (onnxrep.training.adaround)
    ranges: range_search.RangeSearch | None = None  # method auto's record
    op_types: op_search.OpTypeSearch | None = None  # op_search's record


def quantize(model: onnx.ModelProto, calib, config: QuantizeConfig | None = None, *,
             evaluation=None) -> onnx.ModelProto:
    """QDQ INT8 model of ``model`` calibrated on ``calib``; ``model`` is not mutated.

    ``calib``: a :class:`Dataset` or anything ``load_data`` accepts (.npz path, array, dict,
    iterable of feeds, CalibrationDataReader). ``evaluation`` (labelled data) is needed only
    for ``config.max_drop``.
    """
    return quantize_with_details(model, calib, config, evaluation=evaluation).model


def quantize_with_details(model: onnx.ModelProto, calib, config: QuantizeConfig | None = None,
                          *, evaluation=None, batch_size: int | None = None) -> Quantized:
    """Like :func:`quantize`, also returning what was done (see :class:`Quantized`).

    ``Quantized.report`` is the per-layer report of the final model with ``config.report``,
    else the report that ranked nodes for ``auto_exclude``/``max_drop`` (None without them).
    """

    config = config or QuantizeConfig()
    start = time.monotonic()
    clock = _Clock()
    check_opset(model)
    from onnxrep.verify import is_float16  # validation: the INT8 path is float32-only
    if is_float16(model):
        raise UnsupportedModelError("a float16 model: INT8 quantization needs float32; "
                                    "convert it first")
    if config.rounding in LEARNED_ROUNDINGS and not has_torch():
        raise InputError("learned rounding needs torch: pip install 'onnxrep[qat]'",
                         option="rounding")
    dataset = as_dataset(calib, model, batch_size=batch_size)
    if config.max_drop is not None and evaluation is None:
        raise InputError("max_drop needs labelled evaluation data")
    mixed = config.max_drop is not None or config.min_sqnr is not None
    with tempfile.TemporaryDirectory(prefix="onnxrep-quant-") as tmp:
        try:
            # the passes are verified once, on the first batch now and over all data inside
            # calibration, which runs the optimized model over the data anyway
            work, notes, fallback, calibrated, (ranges, info, kept) = _calibrated(
                model, dataset, config, Path(tmp), clock, mixed, deferred=True)
        except VerificationError:
            if config.passes.strict:
                raise
            log("the optimized model failed the check over the data: optimizing again pass "
                "by pass, rolling back the units that break it")
            work, notes, fallback, calibrated, (ranges, info, kept) = _calibrated(
                model, dataset, config, Path(tmp), clock, mixed, deferred=False)
        learning, kept = kept, analysis_part(config, kept)
        searched = None
        if config.method is Method.AUTO:
            with clock("range search"):
                chosen, searched = range_search.search_ranges(work, ranges, kept,
                                                              _range_spec(config), calibrated)
                ranges = range_search.tensors_data(chosen)
            _check_ranges(ranges)
            log(searched.summary())
        quantizer = Quantizer(config, ranges, Path(tmp))
        # bias correction measures int32 biases; a float-bias target is quantized afterwards
        measure = (quantizer if quantizer.options.get("QuantizeBias", True)
                   else Quantizer(config, ranges, Path(tmp), quantize_bias=True))
        picked = None
        if config.op_search:
            with clock("op-type search"):
                picked = op_search.choose(
                    work, config.op_types, lambda types: quantizer(work, config.exclude,
                                                                   op_types=types),
                    mixed_precision.sqnr_score(work, kept, 0.0).value)
            quantizer.op_types = measure.op_types = picked.op_types
            log(picked.summary())
        excluded, report, ranked = list(config.exclude), None, []
        if config.auto_exclude or mixed:
            qdq = quantizer(work, excluded)
            with clock("report"):
                report = sensitivity.layer_report(work, qdq, kept)
            ranked = [r.node for r in report.layers if r.node not in excluded]
            if config.auto_exclude:
                excluded += ranked[:config.auto_exclude]
                log(f"auto-exclude: keeping {', '.join(ranked[:config.auto_exclude])} in FP32")

        def build(precision: dict[str, str]) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
            """(float model, QDQ model, bias correction record) with the nodes of
            ``precision`` ({node: "int16" | "fp32"}) at that precision."""
            exclude = excluded + [n for n, p in precision.items() if p == "fp32"]
            overrides = mixed_precision.int16_overrides(
                work, [n for n, p in precision.items() if p == "int16"],
                activation_type=config.activation_type.value, per_channel=config.per_channel)
            fl = _copy(work)
            if not config.bias_correction:
                return fl, quantizer(fl, exclude, overrides), None
            inside, began = quantizer.seconds, time.monotonic()
            qdq, corr = bias_correction.correct_biases(
                fl, lambda m: measure(m, exclude, overrides), kept)
            clock.add("bias correction",
                      time.monotonic() - began - (quantizer.seconds - inside))
            if measure is not quantizer:  # float biases: quantize the corrected model for real
                qdq = quantizer(fl, exclude, overrides)
            return fl, qdq, corr

        final_float, qdq, bias = build({})
        precision = None
        if mixed:
            with clock("mixed-precision scoring"):
                score = (mixed_precision.sqnr_score(work, kept, config.min_sqnr)
                         if config.min_sqnr is not None
                         else mixed_precision.drop_score(model, evaluation, config.max_drop))
            (final_float, qdq, bias), chosen_precision, precision = mixed_precision.search(
                ranked[:config.max_auto_exclude], fallback, build, score,
                (final_float, qdq, bias))
            excluded += [n for n, p in chosen_precision.items() if p == "fp32"]
        rounding = None
        if config.rounding in LEARNED_ROUNDINGS:
            from onnxrep.training import adaround, brecq

            learn = brecq if config.rounding == "block" else adaround
            with clock("learned rounding"):
                qdq, rounding = learn.learn_rounding(work, qdq, learning)
        if config.report:
            with clock("report"):
                report = sensitivity.layer_report(final_float, qdq, kept)
        clock.add("quantize_static", quantizer.seconds + (measure.seconds
                                                          if measure is not quantizer else 0))
    broken = quantizer.profile.violations(qdq, per_channel=config.per_channel)
    if broken:
        raise VerificationError(f"the QDQ model breaks {config.profile.name}'s placement rules: "
                                + "; ".join(broken[:3]) + (f" (+{len(broken) - 3} more)"
                                                           if len(broken) > 3 else ""))
    return Quantized(qdq, final_float, config, tuple(excluded), notes, info, bias, report,
                     precision, time.monotonic() - start, clock.stages, rounding, searched,
                     picked)


def _calibrated(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig, tmp: Path,
                clock: "_Clock", mixed: bool, *, deferred: bool):
    """Optimize, prepare and calibrate a copy of ``model``: (model, notes, mixed-precision
    fallback, calibrated op types, (ranges, info, kept)). ``deferred``: the optimize passes'
    check over the data is made inside calibration (:class:`VerificationError` when it fails);
    otherwise they are checked pass by pass, each failing unit rolled back."""
    work = _copy(model)
    # names first, on the input's own node order: unnamed nodes get `onnxrep inspect`'s labels
    named = name_nodes(work.graph)
    check = None
    if config.optimize:
        log("optimizing (equivalence-preserving passes)")
        with clock("optimize"):
            optimized = optimize_with_details(work, config.passes, calib=dataset, copy=False,
                                              check_each=not deferred,
                                              defer_data_check=deferred)
            work, check = optimized.model, optimized.data_check
    notes = ([f"{named} unnamed or duplicate node names made unique"] if named else [])
    fallback = config.fallback
    with clock("prepare"):
        if mixed and "int16" in fallback:  # before prepare: the conversion may add Constants
            why = mixed_precision.to_int16_opset(work)
            if why:
                fallback = tuple(p for p in fallback if p != "int16") or ("fp32",)
                notes.append(f"{why}; mixed precision falls back to {', '.join(fallback)}")
        notes += prepare(work, per_channel=config.per_channel)
    _check_excluded(work, config.exclude)
    # calibrate the tensors of every op type the op-type search may add
    calibrated = (config.op_types + tuple(op_search.present(work, config.op_types))
                  if config.op_search else config.op_types)
    with clock("calibration"):
        result = calibrate(work, dataset, replace(config, op_types=calibrated), tmp, check)
    return work, notes, fallback, calibrated, result


def has_torch() -> bool:
    """Whether torch can be imported, without importing it (learned rounding needs it)."""
    import importlib.util
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


class _Clock:
    """Seconds per stage, summed over repeated entries (in the order stages first ran)."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, stage: str):
        began = time.monotonic()
        try:
            yield
        finally:
            self.add(stage, time.monotonic() - began)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work


def _check_excluded(model: onnx.ModelProto, names) -> None:
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"exclude names no node of the model: {', '.join(unknown)} "
                         "(`onnxrep inspect` lists node names)", option="exclude")


# ---- preparation ------------------------------------------------------------------------------

def prepare(model: onnx.ModelProto, *, per_channel: bool) -> list[str]:
    """Make ``model`` (mutated in place) safe for onnxruntime's quantizer; returns notes.

    - ``Constant`` nodes become initializers: onnxruntime treats a Conv weight produced by a
      Constant node as an activation (quantized per-tensor with calibrated ranges, uint8).
    - Per-channel affine ops right after a Conv/ConvTranspose/Gemm (BatchNormalization,
      Mul/Add/Sub/Div by a constant) are folded into it (:class:`FoldAffine`); unused
      initializers are dropped.
    - Every node gets a unique name: exclusion and the reports address nodes by name.
    - Per-channel on opset < 13: converted to opset 13 (onnx.version_converter); onnxruntime
      otherwise writes an invalid model without an error.
    """
    notes = []
    lifted = lift_constants(model.graph)
    if lifted:
        notes.append(f"{lifted} Constant nodes turned into initializers")
    folded = FoldAffine()(model)
    if folded.changes:
        notes.append(f"{len(folded.changes)} per-channel affine ops (BatchNormalization, "
                     "Mul/Add/Sub/Div by a constant) folded into the layer before them")
    for skip in folded.skips:
        notes.append(f"BatchNormalization {skip.node} left in float: {skip.reason}")
    dropped = remove_unused_constants(model.graph, listed_inputs=True)
    if dropped:
        notes.append(f"{dropped} unused initializers dropped")
    renamed = name_nodes(model.graph)
    if renamed:
        notes.append(f"{renamed} unnamed or duplicate node names made unique")
    version = opset_version(model)
    if per_channel and version < PER_CHANNEL_MIN_OPSET:
        converted = convert_opset(model, PER_CHANNEL_MIN_OPSET)
        model.CopyFrom(converted)
        notes.append(f"opset {version} converted to {PER_CHANNEL_MIN_OPSET} for per-channel")
    return notes


def lift_constants(graph: onnx.GraphProto) -> int:
    """Turn top-level ``Constant`` nodes into initializers of the same name; returns how many."""
    keep, count = [], 0
    for node in graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" else None
        if tensor is None:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(keep)
    return count


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(a.floats, np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(a.ints, np.int64)
    return None  # sparse or string constants stay nodes


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give unnamed nodes ``<op>#<index>`` and make duplicate names unique; returns how many."""
    seen, changed = set(), 0
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        # neither an earlier node's name nor a later one's (that node keeps its own)
        node.name = unique_name(node.name or f"{node.op_type}#{i}",
                                seen | (taken - {node.name}), sep="#")
        seen.add(node.name)
        changed += 1
    return changed


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"per-channel quantization needs opset >= {target} and converting opset "
            f"{opset_version(model)} failed: {first}; convert the model yourself or use "
            "per-tensor") from None


# ---- calibration ------------------------------------------------------------------------------

def calibrate(model: onnx.ModelProto, dataset: Dataset, config: QuantizeConfig, tmp: Path,
              check: DataCheck | None = None):
    """Stream ``dataset`` through onnxruntime's calibrator; returns (ranges, info, kept batches).

    ``kept`` holds the first samples for later analysis (:func:`analysis_limit`; with learned
    rounding :func:`rounding_limit`, of which :func:`analysis_part` is the analysis share), so
    a one-shot source is read once. ``check``: the optimize passes' check over the data, fed
    with the model outputs onnxruntime's calibrator computes (and would drop) on every batch,
    so it costs no inference of its own; :class:`VerificationError` when it fails.
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    start = time.monotonic()
    path = tmp / "calibrate.onnx"
    write_to(model, path)
    extra = ({"percentile": config.percentile} if config.method is Method.PERCENTILE else
             {"num_bins": range_search.HISTOGRAM_BINS} if config.method is Method.AUTO else {})
    with quiet_onnxruntime():
        calibrator = create_calibrator(path, list(config.op_types),
                                       augmented_model_path=str(tmp / "augmented.onnx"),
                                       # auto reads the entropy calibrator's histograms
                                       calibrate_method=_ort_method(
                                           Method.ENTROPY if config.method is Method.AUTO
                                           else config.method),
                                       use_external_data_format=_big(model),
                                       extra_options=extra)
    observed = check is not None and _observe(calibrator, check)
    kept: list[Feeds] = []
    kept_rows = samples = batches = 0
    limit = more = None
    total = (math.ceil(dataset.num_samples / dataset.batch_size)
             if dataset.num_samples else None)
    with Progress(total, f"calibrating ({config.method.value})") as bar:
        for chunk in _chunks(dataset.batches(), config.calibration_chunk):
            for feeds in chunk:
                rows = _rows(feeds)
                limit = limit or analysis_limit(config, feeds)
                learns = config.rounding in LEARNED_ROUNDINGS
                more = more or (rounding_limit(config, feeds) if learns else 0)
                if kept_rows < max(limit, more):
                    kept.append(feeds)
                    kept_rows += rows
                samples += rows
            batches += len(chunk)
            with quiet_onnxruntime():
                try:
                    calibrator.collect_data(_ListReader(chunk))
                except _ort_errors() as exc:
                    raise DataError("calibration data does not fit the model: "
                                    f"{_first_line(exc)}") from None
            bar.update(len(chunk))
    if config.method is Method.AUTO:  # histograms: ranges.search_ranges picks from them
        ranges = range_search.histograms(calibrator)
    else:
        with quiet_onnxruntime():
            ranges = calibrator.compute_data()
        _check_ranges(ranges)
    if check is not None and observed and check.batches == batches:
        check.finish()
    elif check is not None:  # the calibrator did not show its outputs: run the model for it
        compare_on_data(check.reference, model, check.dataset, rtol=check.rtol,
                        what=check.what, recorded=check.recorded)
    info = CalibrationInfo(config.method.value, samples, batches, len(ranges.keys()),
                           time.monotonic() - start)
    return ranges, info, kept


class _Observed:
    """An onnxruntime session that hands every run's outputs named in ``check`` to it, as
    onnxruntime's calibrators run ``infer_session.run(None, feeds)`` once per batch."""

    def __init__(self, sess, check: DataCheck):
        self._sess, self._check = sess, check

    def run(self, names, feeds, *args, **kwargs):
        values = self._sess.run(names, feeds, *args, **kwargs)
        got = dict(zip(names or [o.name for o in self._sess.get_outputs()], values))
        if all(n in got for n in self._check.names):
            self._check.add(feeds, got)
        return values

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _observe(calibrator, check: DataCheck) -> bool:
    """Route the calibrator's runs through :class:`_Observed`; False when it keeps its session
    elsewhere (another onnxruntime version): then the check runs the model itself."""
    sess = getattr(calibrator, "infer_session", None)
    if sess is None or not hasattr(sess, "run"):
        return False
    calibrator.infer_session = _Observed(sess, check)
    return True


ANALYSIS_MAX_SAMPLES = 256
ANALYSIS_VALUES = 2**21
ANALYSIS_MIN_SAMPLES = 8


def analysis_limit(config: QuantizeConfig, feeds: Feeds) -> int:
    """Calibration samples kept for bias correction, the per-layer report and learned rounding:
    ``config.analysis_samples`` when set, else as many as hold ``ANALYSIS_VALUES`` input values,
    8 to 256 (45 text lines of 48x320, 8 pages of 480x640, 256 images of 28x28), whole batches.
    What they estimate are per-channel means and errors over samples x positions, and bias
    correction costs about three inferences per kept sample. Measured on the zoo's test sets:
    PP-OCRv6 det per-tensor map SQNR 26.0 dB with 8 and with 16 pages, the layout detector
    6.5 dB with 8 pages and 6.4 with 64; PP-OCRv6 rec char accuracy held with 22 lines (0.9944 /
    0.9972 per-tensor / per-channel, 0.9889 / 0.9958 with 64) but its per-channel output SQNR
    fell to 13.7 dB (18.2 with 64, 18.8 with 33), hence 2^21 rather than 2^20."""
    if config.analysis_samples is not None:
        return config.analysis_samples
    return int(np.clip(ANALYSIS_VALUES // _values(feeds), ANALYSIS_MIN_SAMPLES,
                       ANALYSIS_MAX_SAMPLES))


def analysis_part(config: QuantizeConfig, kept: list[Feeds]) -> list[Feeds]:
    """The first whole batches of ``kept`` that hold :func:`analysis_limit` samples."""
    limit = analysis_limit(config, kept[0]) if kept else 0
    part, rows = [], 0
    for feeds in kept:
        if rows >= limit:
            break
        part.append(feeds)
        rows += _rows(feeds)
    return part


ROUNDING_VALUES = 2**23
ROUNDING_MIN_SAMPLES = 16


def rounding_limit(config: QuantizeConfig, feeds: Feeds) -> int:
    """Calibration samples learned rounding learns on and holds a quarter of out:
    ``config.rounding_samples`` when set, else as many as hold ``ROUNDING_VALUES`` input values,
    16 to 256, whole batches; at least the analysis samples. More than bias correction needs:
    a layer learns one rounding bit per weight, and the late layers of a classifier see one
    position per sample. Measured on the page-orientation classifier per-channel (FP32 output
    SQNR on its 64 test pages): nearest 51.5 dB; learned on 13 samples 51.9 dB, but the
    3 held-out ones scored it below nearest and it was discarded; on 32 samples 53.5 dB, on
    64 samples 55.6 dB, both kept."""
    limit = analysis_limit(config, feeds)
    if config.rounding_samples is not None:
        return max(limit, config.rounding_samples)
    return max(limit, int(np.clip(ROUNDING_VALUES // _values(feeds), ROUNDING_MIN_SAMPLES,
                                  ANALYSIS_MAX_SAMPLES)))


def _values(feeds: Feeds) -> int:
    """Float input values per sample."""
    return sum(int(np.prod(np.shape(v)[1:], dtype=np.int64)) for v in feeds.values()
               if np.issubdtype(np.asarray(v).dtype, np.floating)) or 1


def _check_ranges(ranges) -> None:
    for name, td in ranges.items():
        lo, hi = (np.asarray(v, np.float64) for v in td.range_value)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise DataError(f"calibration produced a non-finite range for tensor '{name}': "
                            "the model overflows or divides by zero on this data")


def _chunks(batches: Iterator[Feeds], size: int) -> Iterator[list[Feeds]]:
    """Up to ``size`` consecutive batches of equal row count (onnxruntime's histogram
    calibrator stacks the outputs of one call, so a short last batch starts a new chunk)."""
    chunk: list[Feeds] = []
    for feeds in batches:
        if chunk and (len(chunk) == size or _rows(feeds) != _rows(chunk[0])):
            yield chunk
            chunk = []
        chunk.append(feeds)
    if chunk:
        yield chunk


def _rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def _ort_errors() -> tuple[type, ...]:
    """The exceptions onnxruntime raises when a run rejects its feeds."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException)


class _ListReader:
    """A CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[Feeds]):
        self._it = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def _ort_method(method: Method):
    from onnxruntime.quantization import CalibrationMethod

    return {Method.MINMAX: CalibrationMethod.MinMax, Method.ENTROPY: CalibrationMethod.Entropy,
            Method.PERCENTILE: CalibrationMethod.Percentile,
            Method.AUTO: CalibrationMethod.MinMax}[method]  # auto: a table of chosen ranges


def _range_spec(config: QuantizeConfig) -> range_search.QuantSpec:
    """How ``quantize_static`` will quantize activations, for the range search."""
    options = config.profile.options()
    return range_search.QuantSpec(_ort_type(config.activation_type),
                                  bool(options.get("ActivationSymmetric", False)),
                                  options.get("MinimumRealRange"))


def _ort_type(qtype: QType):
    from onnxruntime.quantization import QuantType

    return {QType.UINT8: QuantType.QUInt8, QType.INT8: QuantType.QInt8}[qtype]


@contextlib.contextmanager
def quiet_onnxruntime():
    """Silence onnxruntime's quantization warnings and its histogram prints for the block.

    onnxruntime logs them through the root logger itself (``logging.warning``), so a filter on
    the root logger drops exactly the records made in its quantization package and leaves
    everyone else's logging alone; its prints go to stdout, which holds onnxrep's tables and
    JSON, and are captured while the block runs."""
    import io

    def foreign(record: logging.LogRecord) -> bool:
        return f"onnxruntime{os.sep}quantization" not in record.pathname

    root = logging.getLogger()
    root.addFilter(foreign)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(foreign)


def _big(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > 1_800_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- quantization -----------------------------------------------------------------------------

class Quantizer:
    """``quantizer(float_model, exclude) -> QDQ ModelProto`` with fixed calibrated ranges.

    The ranges go to ``quantize_static`` through its calibration cache, so no calibration runs
    again; the float model may differ from the calibrated one only in its biases (bias
    correction) or in which nodes are excluded.
    """

    def __init__(self, config: QuantizeConfig, ranges, tmp: Path, *,
                 quantize_bias: bool | None = None):
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            import onnxruntime

            raise OnnxrepError(f"onnxruntime {onnxruntime.__version__} lacks quantize_static("
                               "calibration_cache_path=...); upgrade onnxruntime")
        self.config, self.tmp = config, tmp
        self.profile = config.profile
        self.options = self.profile.options()
        if quantize_bias is not None:  # bias correction reads int32 biases
            self.options["QuantizeBias"] = quantize_bias
        self.cache = tmp / "ranges.json"
        if not self.cache.exists():
            save_tensors_data(ranges, self.cache)
        self._n = 0
        self.seconds = 0.0  # spent in quantize_static, for the stage split
        self.op_types = tuple(config.op_types)  # the op-type search may add some

    def __call__(self, model: onnx.ModelProto, exclude=(), overrides: dict | None = None, *,
                 op_types: tuple[str, ...] | None = None) -> onnx.ModelProto:
        """``overrides``: onnxruntime ``TensorQuantOverrides`` (mixed precision);
        ``op_types``: instead of ``self.op_types``."""
        began = time.monotonic()
        try:
            return self._quantize(model, exclude, overrides or {}, op_types or self.op_types)
        finally:
            self.seconds += time.monotonic() - began

    def _quantize(self, model: onnx.ModelProto, exclude, overrides, op_types) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, quantize_static

        self._n += 1
        out = self.tmp / f"qdq{self._n}.onnx"
        c = self.config
        keep = list(dict.fromkeys([*exclude, *self.profile.keep_float(model)]))
        options = dict(self.options)
        if overrides:
            options["TensorQuantOverrides"] = overrides
        with quiet_onnxruntime():
            quantize_static(model, str(out), None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=c.per_channel,
                            activation_type=_ort_type(c.activation_type),
                            weight_type=_ort_type(c.weight_type),
                            nodes_to_exclude=keep, extra_options=options,
                            calibrate_method=_ort_method(c.method),
                            calibration_cache_path=str(self.cache),
                            use_external_data_format=_big(model))
        qdq = self.profile.finish(onnx.load(str(out)))
        out.unlink()
        for extra in self.tmp.glob(f"{out.name}.data"):
            extra.unlink()
        return qdq
