"""Compare two models on the same inputs through onnxruntime.

Both run with graph optimizations off, so what is compared is the graph as written. For each
output: max absolute error, relative error (max |a - b| / max |reference|), SQNR in dB and
cosine similarity; for classifier-shaped outputs ([N, K]) also top-1 agreement. The relative
error is also "the tolerance that would have been needed", which a failed check reports.

An output produced by a bounded activation (Sigmoid, HardSigmoid, Softmax: [0, 1]; Tanh:
[-1, 1]) is measured against that range when its values are smaller: on random inputs a
detector's sigmoid map saturates to ~1e-6 everywhere, and 1e-7 of float rounding would
otherwise read as a 10% change (:func:`output_bounds`).
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from onnxrep.errors import InputError, UnsupportedModelError, VerificationError
from onnxrep.ir.model import serialize, write_to

DEFAULT_BATCH = 2
DEFAULT_DIM = 64

ModelLike = onnx.ModelProto | str | os.PathLike


def session(model: ModelLike, *, optimized: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimizations off unless ``optimized``."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, onnx.ModelProto):
            data = serialize(model)
            if data is None:  # past 2 GB: go through a file with external data
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "model.onnx"
                    write_to(model, path)
                    return ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {first}") from None


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps a released session's ~model-size
    pages otherwise, which would count against the next peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def run(model: ModelLike | ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict:
    """Run a model once; returns ``{output name: array}``."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, dict(feeds))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsupportedModelError(f"onnxruntime failed to run the model: {first}") from None
    return dict(zip(names, values))


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints, or str / None for symbolic dims


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input '{v.name}' is not a tensor")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim)
        specs.append(InputSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims))
    return specs


def resolve_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple] | None = None,
                   batch: int = DEFAULT_BATCH, default_dim: int = DEFAULT_DIM) -> dict:
    """Concrete shapes for every input: overrides first, then symbolic axis 0 -> ``batch``,
    other symbolic axes -> ``default_dim`` (a multiple of 32, which strided nets accept)."""
    overrides = dict(overrides or {})
    shapes = {}
    for spec in input_specs(model):
        if spec.name in overrides:
            shape = tuple(overrides.pop(spec.name))
            if len(shape) != len(spec.shape) or any(
                    isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, shape)):
                raise InputError(f"input shape {spec.name}: {_fmt(shape)} does not fit the "
                                 f"model's {_fmt(spec.shape)}", option="input_shape")
        else:
            shape = tuple(d if isinstance(d, int) and d > 0 else (batch if i == 0 else default_dim)
                          for i, d in enumerate(spec.shape))
        shapes[spec.name] = shape
    if overrides:
        raise InputError(f"input shapes name unknown input(s): {', '.join(overrides)}; "
                         f"inputs are: {', '.join(shapes)}", option="input_shape")
    return shapes


_BOUNDED_OPS = {"Sigmoid": 1.0, "HardSigmoid": 1.0, "Softmax": 1.0, "Tanh": 1.0}


def output_bounds(model: onnx.ModelProto) -> dict[str, float]:
    """Graph outputs produced by a bounded activation -> the largest |value| it can take."""
    producers = {out: n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")
                 for out in n.output}
    return {o.name: _BOUNDED_OPS[producers[o.name]] for o in model.graph.output
            if producers.get(o.name) in _BOUNDED_OPS}


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple] | None = None,
                  seed: int = 0) -> dict:
    """Seeded inputs of the model's own shapes: standard normal floats, small ints, bools."""
    rng = np.random.default_rng(seed)
    resolved = resolve_shapes(model, shapes)
    feeds = {}
    for spec in input_specs(model):
        shape = resolved[spec.name]
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 4, shape).astype(spec.dtype)
    return feeds


@dataclass(frozen=True)
class OutputMetrics:
    max_abs: float
    rel: float  # max |a - b| / max(max |reference|, the output's bound if bounded)
    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None


@dataclass(frozen=True)
class Comparison:
    outputs: dict  # name -> OutputMetrics

    @property
    def rel(self) -> float:
        """Worst relative error over outputs: the tolerance that would have been needed."""
        return max((m.rel for m in self.outputs.values()), default=0.0)

    @property
    def sqnr_db(self) -> float:
        return min((m.sqnr_db for m in self.outputs.values()), default=math.inf)

    def as_dict(self) -> dict:
        return {name: asdict(m) for name, m in self.outputs.items()}

    def summary(self) -> str:
        top1 = [m.top1_agreement for m in self.outputs.values() if m.top1_agreement is not None]
        text = f"max rel err {self.rel:.2e}, SQNR {self.sqnr_db:.1f} dB"
        return text + (f", top-1 agreement {min(top1):.4f}" if top1 else "")


def metrics(reference: np.ndarray, candidate: np.ndarray, bound: float = 0.0
            ) -> OutputMetrics:
    """``bound``: the output's activation range (:func:`output_bounds`), a floor for the
    relative error's denominator. Never raises on inf/NaN: a value the candidate gets wrong
    where the reference is finite counts as an infinite error; identical non-finite values
    (the same inf, NaN against NaN) count as equal. Computed in float64 without overflow."""
    if (np.asarray(reference).dtype == np.float32 == np.asarray(candidate).dtype
            and np.shape(reference) == np.shape(candidate)
            and np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return _finite_float32_metrics(np.asarray(reference), np.asarray(candidate), bound)
    ref = np.asarray(reference, np.float64)
    cand = np.asarray(candidate, np.float64)
    if ref.shape != cand.shape:
        raise VerificationError(f"output shapes differ: {ref.shape} vs {cand.shape}")
    with np.errstate(all="ignore"):
        same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
        diff = np.where(same, 0.0, np.abs(ref - cand))
        diff[np.isnan(diff)] = np.inf
        max_abs = float(diff.max(initial=0.0))
        ref_f = np.where(np.isfinite(ref), ref, 0.0)
        cand_f = np.where(np.isfinite(cand), cand, 0.0)
        scale = max(float(np.abs(ref_f).max(initial=0.0)), bound)
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        # sums of squares on values scaled to <= 1, so 1e200 outputs do not overflow
        unit = max(float(np.abs(ref_f).max(initial=0.0)), float(np.abs(cand_f).max(initial=0.0)))
        unit = unit if unit > 0 else 1.0
        r, c = ref_f / unit, cand_f / unit
        d = np.where(np.isfinite(diff), diff / unit, np.inf)
        noise, signal = float(np.sum(d * d)), float(np.sum(r * r))
        norms = float(np.linalg.norm(r) * np.linalg.norm(c))
        cosine = float(np.sum(r * c) / norms) if norms > 0 else float(max_abs == 0)
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float(np.mean(np.argmax(ref_f, 1) == np.argmax(cand_f, 1)))
    return OutputMetrics(max_abs, rel, sqnr_db(signal, noise), cosine, top1)


def _finite_float32_metrics(ref: np.ndarray, cand: np.ndarray, bound: float) -> OutputMetrics:
    """:func:`metrics` of finite float32 outputs (the common case) without float64 copies:
    the difference in float32 (exact where they nearly agree), sums accumulated in float64,
    which float32 squares cannot overflow."""
    diff = (ref - cand).ravel()
    r, c = ref.ravel(), cand.ravel()
    max_abs = float(max(diff.max(initial=0.0), -diff.min(initial=0.0)))
    scale = max(float(max(r.max(initial=0.0), -r.min(initial=0.0))), bound)
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    noise, signal = _dot(diff, diff), _dot(r, r)
    norms = math.sqrt(signal) * math.sqrt(_dot(c, c))
    cosine = _dot(r, c) / norms if norms > 0 else float(max_abs == 0)
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float(np.mean(np.argmax(ref, 1) == np.argmax(cand, 1)))
    return OutputMetrics(max_abs, rel, sqnr_db(signal, noise), cosine, top1)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) of two 1-D arrays, accumulated in float64."""
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), total on every input: inf without noise, -inf without signal
    (or infinite noise), never a math domain error."""
    if noise == 0:
        return math.inf
    if not signal > 0 or not math.isfinite(noise) or math.isnan(signal):
        return -math.inf
    ratio = signal / noise
    if ratio == 0:
        return -math.inf
    return math.inf if math.isinf(ratio) else 10 * math.log10(ratio)


def nonfinite(outputs: Mapping[str, np.ndarray]) -> str | None:
    """'output 'y' holds 3 NaN and 1 inf value(s)' for the first output with non-finite
    values, else None."""
    for name, value in outputs.items():
        a = np.asarray(value)
        if a.dtype.kind not in "fc":
            continue
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.isnan(a).sum())
            inf = int(a.size - finite.sum()) - nan
            parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
            return f"output '{name}' holds {' and '.join(p for p in parts if p)} value(s)"
    return None


def check_reference(outputs: Mapping[str, np.ndarray], where: str) -> None:
    """The original model must give finite outputs to be verified against: when it already
    outputs inf/NaN, say so (an input problem, exit 2), rather than blame the first pass."""
    problem = nonfinite(outputs)
    if problem:
        raise InputError(f"the original model already outputs inf/NaN on {where} ({problem}): "
                         "its outputs cannot be verified; check its weights (a BatchNormalization "
                         "with variance 0 and epsilon 0, a division by zero) or the data")


def check_weights(model: onnx.ModelProto) -> None:
    """Refuse NaN/inf in any float initializer or Constant, naming the tensor and a node that
    reads it: 'weight 'W' of node 'conv3' holds 2 NaN values'."""
    from onnx import numpy_helper

    consumers: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, node.name or f"{node.op_type}#{i}")
    tensors = [(t.name, t) for t in model.graph.initializer]
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    tensors.append((node.output[0], a.t))
    for name, tensor in tensors:
        if tensor.data_type not in _FLOAT_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL \
                and not tensor.raw_data:
            continue
        try:
            a = numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - unreadable tensors are onnxruntime's to report
            continue
        finite = np.isfinite(a)
        if finite.all():
            continue
        nan = int(np.isnan(a).sum())
        inf = int(a.size - finite.sum()) - nan
        what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "")
                            if p)
        node = consumers.get(name)
        where = f" of node '{node}'" if node else ""
        raise InputError(f"weight '{name}'{where} holds {what} value{'s' if nan + inf > 1 else ''}; "
                         "onnxrep needs finite weights")


FP16_RTOL = 1e-2  # ~20 float16 ulps of the largest output: what fp16 rounding of a few layers gives


def is_float16(model: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 (a float16 input, output or initializer)."""
    f16 = onnx.TensorProto.FLOAT16
    return (any(v.type.tensor_type.elem_type == f16
                for v in [*model.graph.input, *model.graph.output])
            or any(t.data_type == f16 for t in model.graph.initializer))


def effective_rtol(model: onnx.ModelProto, rtol: float) -> float:
    """The tolerance a check uses: ``rtol``, floored at :data:`FP16_RTOL` for float16 models,
    whose own rounding (eps 9.8e-4 per op) exceeds float32's default 1e-4."""
    return max(rtol, FP16_RTOL) if is_float16(model) else rtol


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def compare_outputs(reference: Mapping[str, np.ndarray],
                    candidate: Mapping[str, np.ndarray],
                    bounds: Mapping[str, float] | None = None) -> Comparison:
    """Every output of ``reference`` against ``candidate``; ``bounds`` from
    :func:`output_bounds` of the reference model."""
    bounds = bounds or {}
    missing = set(reference) - set(candidate)
    if missing:
        raise VerificationError(f"outputs missing from the candidate: {', '.join(sorted(missing))}")
    return Comparison({name: metrics(reference[name], candidate[name], bounds.get(name, 0.0))
                       for name in reference})


def compare(reference: ModelLike, candidate: ModelLike,
            feeds: Mapping[str, np.ndarray]) -> Comparison:
    """Run both models on ``feeds`` (optimizations off) and compare every output."""
    bounds = output_bounds(reference) if isinstance(reference, onnx.ModelProto) else None
    return compare_outputs(run(reference, feeds), run(candidate, feeds), bounds)


def check(comparison: Comparison, rtol: float, what: str) -> None:
    """Raise :class:`VerificationError` when the worst relative error exceeds ``rtol``."""
    if not comparison.rel <= rtol:
        raise VerificationError(
            f"{what} changed the model's outputs: relative error {comparison.rel:.3e} > "
            f"tolerance {rtol:.1e}", comparison, needed=needed_tolerance(comparison.rel))


def needed_tolerance(rel: float) -> float:
    """The power of ten at or above ``rel``: the tolerance that would have passed."""
    if not math.isfinite(rel) or rel > 1e300:
        return math.inf
    return 10.0 ** math.ceil(math.log10(max(rel, 1e-30)))


def _fmt(shape) -> str:
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape)
