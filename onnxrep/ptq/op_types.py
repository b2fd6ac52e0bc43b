"""Which extra op types to quantize, chosen by measurement (``QuantizeConfig.op_search``).

The target's op types (Conv/Gemm/MatMul and the ops onnxruntime fuses around them) are always
quantized. The ops of :data:`CANDIDATES` (decomposed LayerNorm: ReduceMean, Sub, Pow, Sqrt, Div;
Softmax; GELU's Erf; HardSwish, HardSigmoid; the Add/Mul of gates and affine pairs) get Q/DQ
around their inputs and outputs only if that does not lower the model's output SQNR against
FP32 on the analysis samples,

    SQNR = min over outputs of 10 log10(sum y^2 / sum (y - y_q)^2),

tried one op type at a time, most frequent first, each on top of those already kept (greedy).
A kept op type lets onnxruntime run it on integers (or at least keeps the tensors between
quantized layers in int8); a refused one stays float with the SQNR it would have cost in the
record. Nothing is left in float that the default would quantize: this only decides whether the
*extra* Q/DQ are inserted.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import onnx

CANDIDATES = ("Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "ReduceMean", "Softmax", "Erf",
              "HardSwish", "HardSigmoid", "Sigmoid", "Concat")


def present(model: onnx.ModelProto, base) -> list[str]:
    """The candidate op types ``model`` has that ``base`` does not quantize, most frequent
    first."""
    counts = Counter(n.op_type for n in model.graph.node
                     if n.op_type in CANDIDATES and n.op_type not in base)
    return [op for op, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass
class OpTypeTrial:
    op_type: str
    nodes: int
    sqnr_db: float  # output SQNR with this op type added
    before_db: float
    kept: bool

    def as_dict(self) -> dict:
        return vars(self).copy()


@dataclass
class OpTypeSearch:
    op_types: tuple[str, ...]  # quantized in the end
    baseline_db: float
    trials: list[OpTypeTrial] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        kept = [t.op_type for t in self.trials if t.kept]
        lines = [f"op types by measurement: baseline output SQNR {self.baseline_db:.2f} dB; "
                 f"quantized too: {', '.join(kept) or 'none'}; "
                 f"{len(self.trials) - len(kept)} left in float ({self.seconds:.1f} s)"]
        for t in self.trials:
            verdict = "quantized" if t.kept else "left in float: it lowers the output SQNR"
            lines.append(f"  {t.op_type} ({t.nodes} nodes): {t.before_db:.2f} -> "
                         f"{t.sqnr_db:.2f} dB, {verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"op_types": list(self.op_types), "baseline_db": self.baseline_db,
                "seconds": self.seconds, "trials": [t.as_dict() for t in self.trials]}


def choose(model: onnx.ModelProto, base: tuple[str, ...], quantize: Callable,
           sqnr: Callable[[onnx.ModelProto], float]) -> OpTypeSearch:
    """Greedy over :func:`present` (module docstring). ``quantize(op_types)`` -> QDQ model;
    ``sqnr(qdq)`` -> output SQNR in dB."""
    began = time.monotonic()
    kept = tuple(base)
    value = sqnr(quantize(kept))
    record = OpTypeSearch(kept, value)
    counts = Counter(n.op_type for n in model.graph.node)
    for op in present(model, base):
        v = sqnr(quantize(kept + (op,)))
        ok = v >= value
        record.trials.append(OpTypeTrial(op, counts[op], v, value, ok))
        if ok:
            kept, value = kept + (op,), v
    record.op_types = kept
    record.seconds = time.monotonic() - began
    return record
