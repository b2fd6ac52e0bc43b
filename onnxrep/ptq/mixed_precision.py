"""Mixed precision against a target: per sensitive node, int16 QDQ or FP32 (``--min-sqnr``,
``--max-drop``).

Greedy over the per-layer report (:mod:`onnxrep.ptq.sensitivity`, worst local SQNR first): while
the target is not met, the next node is tried at each precision of ``fallback`` in order
(default int16, then fp32); the first that raises the score is kept and the next node is
tried; a node that no precision helps stays int8. The search stops as soon as the target
holds, so only the candidates it needs are built and scored. Scores, higher is better:

- ``min_sqnr`` (no labels): min over outputs of 10 log10(sum y^2 / sum (y - y_q)^2), y the FP32
  model's output on the analysis samples;
- ``max_drop`` (labelled): -(top-1 FP32 - top-1 quantized) in points.

An int16 node is the node with every tensor it touches at 16 bits: its activation inputs and
its output (the output of a Relu/Clip that onnxruntime folds into it) as uint16 (int16 when
activations are int8), its weight as int16, all through onnxruntime's ``TensorQuantOverrides``
(its int32 bias keeps scale = input scale x weight scale). A neighbour reading one of those
tensors reads it at 16 bits too. ONNX has 16-bit QuantizeLinear/DequantizeLinear from opset 21,
so the model is converted to opset 21 first (onnx.version_converter; onnxruntime would convert
inside ``quantize_static`` otherwise, behind the float model's back); if that fails int16 is
dropped with a note. int16 QDQ runs in onnxruntime as DequantizeLinear -> float op; only the
onnxruntime target offers it (TensorRT and OpenVINO have no int16 QDQ path here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnxrep import verify
from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.progress import log

PRECISIONS = ("int16", "fp32")
INT16_OPSET = 21
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def default_fallback(profile) -> tuple[str, ...]:
    return PRECISIONS if profile.name == "onnxruntime" else ("fp32",)


def fallback_problems(fallback, profile) -> list[str]:
    bad = [p for p in fallback if p not in PRECISIONS]
    if bad or not fallback or len(set(fallback)) != len(fallback):
        return [f"fallback must list distinct precisions of {', '.join(PRECISIONS)}, "
                f"not {', '.join(map(str, fallback)) or 'none'}"]
    if "int16" in fallback and profile.name != "onnxruntime":
        return [f"int16 QDQ is offered for the onnxruntime target only, not {profile.name}"]
    return []


@dataclass
class Step:
    """One node of the greedy: the precision kept ("int8" when none helped) and the score
    before and after (dB or -pp), with every precision tried."""

    node: str
    choice: str
    before: float
    after: float
    tried: dict[str, float]

    @property
    def bought(self) -> float:
        return self.after - self.before

    def as_dict(self) -> dict:
        return {"node": self.node, "choice": self.choice, "before": self.before,
                "after": self.after, "bought": self.bought, "tried": self.tried}


@dataclass
class MixedPrecision:
    """What the search did; ``unit``: "dB" (output SQNR) or "pp" (top-1 drop)."""

    target: str
    unit: str
    start: float
    final: float
    met: bool
    steps: list[Step] = field(default_factory=list)

    def nodes(self, precision: str) -> list[str]:
        return [s.node for s in self.steps if s.choice == precision]

    def _show(self, v: float) -> str:
        return f"{v:.2f} dB" if self.unit == "dB" else f"drop {-v:.2f} pp"

    def summary(self) -> str:
        lines = [f"mixed precision ({self.target}): {self._show(self.start)} -> "
                 f"{self._show(self.final)}, {'met' if self.met else 'NOT met'}; "
                 f"{len(self.nodes('int16'))} node(s) int16, {len(self.nodes('fp32'))} fp32"]
        for s in self.steps:
            tried = ", ".join(f"{p} {self._show(v)}" for p, v in s.tried.items())
            lines.append(f"  {s.node}: {s.choice} ({s.bought:+.2f} {self.unit}; tried {tried})")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"target": self.target, "unit": self.unit, "start": self.start,
                "final": self.final, "met": self.met,
                "int16": self.nodes("int16"), "fp32": self.nodes("fp32"),
                "steps": [s.as_dict() for s in self.steps]}


# ---- scores --------------------------------------------------------------------------------

@dataclass
class Score:
    """``value(qdq)``: higher is better; ``met(value)``: the target holds."""

    target: str
    unit: str
    value: Callable[[onnx.ModelProto], float]
    met: Callable[[float], bool]


def sqnr_score(float_model: onnx.ModelProto, batches: list[dict], min_sqnr: float) -> Score:
    """Output SQNR vs ``float_model`` on ``batches`` (its outputs computed once)."""
    sess = verify.session(float_model)
    names = [o.name for o in sess.get_outputs()]
    reference = [dict(zip(names, sess.run(names, feeds))) for feeds in batches]

    def value(qdq: onnx.ModelProto) -> float:
        q = verify.session(qdq)
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        for feeds, ref in zip(batches, reference):
            for name, y in zip(names, q.run(names, feeds)):
                r = ref[name].astype(np.float64)
                signal[name] += float(np.sum(r * r))
                noise[name] += float(np.sum((r - y) ** 2))
        return min(verify.sqnr_db(signal[n], noise[n]) for n in names)

    return Score(f"output SQNR >= {min_sqnr:g} dB", "dB", value, lambda v: v >= min_sqnr)


def drop_score(original: onnx.ModelProto, evaluation, max_drop: float) -> Score:
    """Minus the top-1 drop in points against ``original`` on labelled ``evaluation``."""
    from onnxrep.data import as_dataset
    from onnxrep.errors import DataError
    from onnxrep.evaluation import evaluate

    data = as_dataset(evaluation, original)
    if data.labels is None:
        raise DataError("max_drop needs evaluation data with labels")
    fp32 = evaluate(original, data).top1
    return Score(f"top-1 drop <= {max_drop:g} pp", "pp",
                 lambda qdq: -100 * (fp32 - evaluate(qdq, data).top1),
                 lambda v: -v <= max_drop)


# ---- the search ----------------------------------------------------------------------------

def search(ranked: list[str], fallback: tuple[str, ...], build: Callable, score: Score,
           current: tuple) -> tuple[tuple, dict[str, str], MixedPrecision]:
    """Greedy (module docstring). ``build(assignment)`` -> a tuple whose [1] is the QDQ model,
    ``assignment`` {node: precision}; ``current``: the tuple built with {}. Returns the tuple
    kept, its assignment and the record."""
    value = score.value(current[1])
    record = MixedPrecision(score.target, score.unit, value, value, score.met(value))
    assignment: dict[str, str] = {}
    log(f"mixed precision: start {record._show(value)}, target {score.target}")
    for node in ranked:
        if score.met(value):
            break
        tried, kept = {}, None
        for precision in fallback:
            built = build({**assignment, node: precision})
            tried[precision] = v = score.value(built[1])
            log(f"mixed precision: {node} {precision} -> {record._show(v)}")
            if v > value:
                kept = (precision, v, built)
                break
        if kept is None:
            record.steps.append(Step(node, "int8", value, value, tried))
            continue
        precision, v, current = kept
        record.steps.append(Step(node, precision, value, v, tried))
        assignment[node] = precision
        value = v
    record.final, record.met = value, score.met(value)
    if not record.met:
        log(f"mixed precision: {score.target} not reached; keeping the best "
            f"({record._show(value)})")
    return current, assignment, record


# ---- int16 QDQ through onnxruntime's overrides ---------------------------------------------

def to_int16_opset(model: onnx.ModelProto) -> str | None:
    """Convert ``model`` (in place) to opset 21 when below; returns why int16 is unavailable
    (conversion failed), else None."""
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                  default=0)
    if version >= INT16_OPSET:
        return None
    try:
        converted = onnx.version_converter.convert_version(model, INT16_OPSET)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"int16 needs opset {INT16_OPSET} and converting opset {version} failed: {first}"
    model.CopyFrom(converted)
    return None


def int16_overrides(model: onnx.ModelProto, nodes, *, activation_type: str, per_channel: bool,
                    folded=("Relu", "Clip")) -> dict:
    """onnxruntime ``TensorQuantOverrides`` putting every tensor of ``nodes`` at 16 bits
    (module docstring); ``folded``: the activation op types onnxruntime folds into the layer
    before them (those quantized)."""
    from onnxruntime.quantization import QuantType

    act = QuantType.QUInt16 if activation_type == "uint8" else QuantType.QInt16
    index = GraphIndex(model.graph)
    by_name = {n.name: n for n in model.graph.node}
    overrides: dict[str, list[dict]] = {}
    for name in nodes:
        node = by_name[name]
        weight = (node.input[1] if node.op_type in _WEIGHT_OPS and len(node.input) > 1
                  and node.input[1] in index.initializers else None)
        for x in node.input:
            if x and x != weight and not index.is_const(x):
                overrides[x] = [{"quant_type": act}]
        out = node.output[0]
        readers = index.readers(out)
        if len(readers) == 1 and index.node(readers[0]).op_type in folded:
            out = index.node(readers[0]).output[0]
        overrides[out] = [{"quant_type": act}]
        if weight is not None:
            entry = {"quant_type": QuantType.QInt16}
            if per_channel:
                entry["axis"] = _weight_axis(node)
            overrides[weight] = [entry]
    return overrides


def _weight_axis(node: onnx.NodeProto) -> int:
    """The per-channel axis onnxruntime's QDQ quantizer uses for this op's weight."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if int(attr(node, "transB", 0)) else 1
    if node.op_type == "MatMul":
        return 1
    return 0
