"""Activation ranges chosen per tensor by the error of the layers that read it (``--method auto``).

One calibration pass collects a signed histogram of every tensor onnxruntime will quantize
(onnxruntime's own histogram collector, 2048 bins over [-max|x|, max|x|], merged across
chunks). Each tensor then gets a few candidate ranges [lo, hi], all read off that histogram:

- ``minmax``: the observed [min, max];
- ``pP``: the two-sided percentile, each tail keeping (100 - P)/2 % of the values outside;
- ``mse``: the clipping that minimises the expected squared quantization error of the tensor
  itself over ranges [a_lo min, a_hi max], each a on a geometric grid in [1e-3, 1] (an
  outlier can sit orders of magnitude above the bulk; coordinate descent on the two ends):

      E(a) = sum_b n_b * (s_a^2 / 12        if lo_a <= c_b <= hi_a
                          dist(c_b, [lo_a, hi_a])^2   otherwise),

  with bin centres c_b, counts n_b and step s_a = (hi_a - lo_a) / (qmax - qmin) (rounding
  noise inside the range, clipping error outside).

The candidates are scored where the error matters, on the layers that read the tensor: one
onnxruntime session holds the FP32 graph and, for every tensor and candidate, a
QuantizeLinear/DequantizeLinear of the tensor with that candidate's scale and zero point
(onnxruntime's own ``compute_scale_zp``, so they are the ones ``quantize_static`` will write)
feeding copies of each consumer node (its other inputs float). Per candidate,

    score = sum_consumers  sum (y_c - y_c~)^2 / sum y_c^2     over the analysis batches,

with y_c the consumer's FP32 output and y_c~ its output on the quantized tensor (a graph output,
or a tensor read only by ops whose output is not a float function of it, such as Shape, is
scored on itself). Only scalar sums leave the session. The lowest score wins; minmax is kept
unless a clipped range lowers the score by more than ``MARGIN`` (1%), so a choice is never
made on noise. The chosen [lo, hi] go to ``quantize_static`` through its calibration table,
which makes them exact: the scale and zero point it computes from them are the ones scored.

Tensors that onnxruntime re-ranges itself are left at minmax and not searched: the input of a
Relu/Clip it folds into the layer before (it takes the activation's output range) and a
Softmax output (it pins [0, 1]).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxrep.ir.graph import GraphIndex
from onnxrep.passes.base import Skip
from onnxrep.ptq.sensitivity import summed_outputs

PERCENTILES = (99.99, 99.999)
MSE_GRID, MSE_SMALLEST = 96, 1e-3  # clipping factors a: MSE_GRID geometric steps in [1e-3, 1]
MARGIN = 0.01  # a clipped range must lower the score by this share to replace minmax
HISTOGRAM_BINS = 2048
# consumers whose output is not a float function of the values (scored on the tensor instead)
_NOT_FLOAT = ("Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less",
              "GreaterOrEqual", "LessOrEqual", "Cast", "TopK")
_SAME = 1e-3  # candidates whose ends differ by less than this share of the range are one


@dataclass(frozen=True)
class Candidate:
    kind: str  # "minmax", "p99.99", "mse", ...
    lo: float
    hi: float


@dataclass
class RangeChoice:
    """One tensor's search: the candidates' scores (relative consumer error) and the winner."""

    tensor: str
    chosen: Candidate
    scores: dict[str, float]
    consumers: int

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "chosen": self.chosen.kind, "lo": self.chosen.lo,
                "hi": self.chosen.hi, "scores": self.scores, "consumers": self.consumers}


@dataclass
class RangeSearch:
    """What ``--method auto`` chose, per tensor."""

    choices: list[RangeChoice]
    samples: int
    seconds: float
    skips: list[Skip] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.chosen.kind for c in self.choices).most_common())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.counts().items())
        return (f"range search: {len(self.choices)} tensors scored on their consumers over "
                f"{self.samples} samples in {self.seconds:.1f} s; chosen: {kinds or 'none'}"
                + (f"; {len(self.skips)} left at minmax (onnxruntime sets their range)"
                   if self.skips else ""))

    def as_dict(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds, "counts": self.counts(),
                "tensors": [c.as_dict() for c in self.choices],
                "skipped": [vars(s) for s in self.skips]}


# ---- candidates from a histogram ------------------------------------------------------------

def candidates(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, *,
               levels: int) -> list[Candidate]:
    """minmax, percentiles and the MSE-optimal clipping of one tensor (module docstring);
    near-duplicates dropped (minmax kept first). ``levels`` = qmax - qmin."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    out = [Candidate("minmax", lo, hi)]
    counts = hist.astype(np.float64)
    total = counts.sum()
    if total <= 0 or hi - lo <= 0:
        return out
    cdf = np.cumsum(counts) / total
    for p in PERCENTILES:
        tail = (100.0 - p) / 200.0
        a = float(edges[np.searchsorted(cdf, tail, side="left")])
        b = float(edges[min(np.searchsorted(cdf, 1.0 - tail, side="left") + 1, len(edges) - 1)])
        out.append(Candidate(f"p{p:g}", max(min(a, 0.0), lo), min(max(b, 0.0), hi)))
    out.append(_mse_candidate(counts, 0.5 * (edges[1:] + edges[:-1]), lo, hi, levels))
    unique: list[Candidate] = []
    for c in out:
        if c.hi - c.lo > 0 and not any(_same(c, u, hi - lo) for u in unique):
            unique.append(c)
    return unique


def _mse_candidate(counts, centres, lo, hi, levels) -> Candidate:
    """Coordinate descent on the two ends (each side's clipping error is its own, the rounding
    noise couples them through the step): hi over its grid with lo fixed, then lo, twice."""
    grid = np.geomspace(MSE_SMALLEST, 1.0, MSE_GRID)
    l, h = lo, hi
    for _ in range(2):
        h = float(hi * grid[np.argmin([_expected_mse(counts, centres, l, hi * a, levels)
                                       for a in grid])]) if hi > 0 else 0.0
        l = float(lo * grid[np.argmin([_expected_mse(counts, centres, lo * a, h, levels)
                                       for a in grid])]) if lo < 0 else 0.0
    return Candidate("mse", l, h)


def _expected_mse(counts, centres, l, h, levels) -> float:
    step = (h - l) / levels
    outside = np.maximum(l - centres, 0) + np.maximum(centres - h, 0)
    return float(counts[outside == 0].sum() * step * step / 12 + (counts * outside ** 2).sum())


def _same(a: Candidate, b: Candidate, span: float) -> bool:
    return abs(a.lo - b.lo) <= _SAME * span and abs(a.hi - b.hi) <= _SAME * span


def histograms(calibrator) -> dict:
    """The histograms an onnxruntime entropy calibrator collected ({tensor: (hist, edges, min,
    max, ...)}), without its entropy computation."""
    return dict(calibrator.collector.histogram_dict) if calibrator.collector else {}


def tensors_data(ranges: dict):
    """{tensor: (lo, hi)} as onnxruntime's ``TensorsData`` (its calibration table)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    return TensorsData(CalibrationMethod.MinMax, {
        t: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for t, (lo, hi) in ranges.items()})


# ---- scoring on the consumers ----------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """How onnxruntime will quantize activations: its QuantType, symmetry, MinimumRealRange."""

    qtype: object  # onnxruntime.quantization.QuantType
    symmetric: bool
    min_real_range: float | None = None

    def params(self, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) exactly as ``quantize_static`` computes them from [lo, hi]."""
        from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

        qmin, qmax = get_qmin_qmax_for_qType(self.qtype.tensor_type, symmetric=self.symmetric)
        zero, scale = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax,
                                       self.symmetric, self.min_real_range)
        return np.asarray(scale, np.float32), np.asarray(zero)

    @property
    def levels(self) -> int:
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

        qmin, qmax = get_qmin_qmax_for_qType(self.qtype.tensor_type, symmetric=self.symmetric)
        return int(qmax) - int(qmin)


def searchable(model: onnx.ModelProto, tensors, op_types) -> tuple[list[str], list[Skip]]:
    """The calibrated tensors whose range is ours to choose, and those onnxruntime re-ranges."""
    index = GraphIndex(model.graph)
    keep, skips = [], []
    quantized = set(op_types)
    for t in tensors:
        readers = [index.node(i) for i in index.readers(t)]
        producer = index.producer.get(t)
        if (len(readers) == 1 and readers[0].op_type in ("Relu", "Clip")
                and readers[0].op_type in quantized and readers[0].output[0] in tensors):
            skips.append(Skip(t, f"input of {readers[0].op_type} {readers[0].name}, which "
                                 "onnxruntime folds: it takes that output's range"))
        elif (producer is not None and index.node(producer).op_type == "Softmax"
              and "Softmax" in quantized):
            skips.append(Skip(t, "Softmax output: onnxruntime pins [0, 1]"))
        else:
            keep.append(t)
    return keep, skips


def search_ranges(model: onnx.ModelProto, histograms: dict, batches: list[dict],
                  spec: QuantSpec, op_types) -> tuple[dict, RangeSearch]:
    """Choose each tensor's range; returns ({tensor: (lo, hi)} for every histogram, record).

    ``histograms``: onnxruntime's ``HistogramCollector.histogram_dict`` ({tensor: (hist,
    edges, min, max, ...)}); ``batches``: the analysis feeds; ``model`` is not mutated."""
    began = time.monotonic()
    ranges = {t: (min(float(h[2]), 0.0), max(float(h[3]), 0.0)) for t, h in histograms.items()}
    names, skips = searchable(model, list(histograms), op_types)
    pool = {t: candidates(histograms[t][0], histograms[t][1], histograms[t][2],
                          histograms[t][3], levels=spec.levels) for t in names}
    contested = [t for t in names if len(pool[t]) > 1]
    choices = [RangeChoice(t, pool[t][0], {}, 0) for t in names if len(pool[t]) == 1]
    samples = 0
    if contested:
        graph = _ScoringGraph(model, {t: pool[t] for t in contested}, spec)
        sums, samples = graph.run(batches)
        choices += [graph.choose(t, sums) for t in contested]
    for c in choices:
        ranges[c.tensor] = (c.chosen.lo, c.chosen.hi)
    choices.sort(key=lambda c: c.tensor)
    return ranges, RangeSearch(choices, samples, time.monotonic() - began, skips)


class _ScoringGraph:
    """The FP32 graph plus, per (tensor, candidate), Q/DQ -> copies of the tensor's consumers
    -> squared-error sums; every output is a scalar."""

    def __init__(self, model: onnx.ModelProto, pool: dict[str, list[Candidate]], spec: QuantSpec):
        self.index = GraphIndex(model.graph)
        self.pool = pool
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.signal: dict[str, str] = {}  # reference tensor -> its sum-of-squares output
        self.terms: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (t, kind) -> (noise, ref)
        self.consumers: dict[str, int] = {}
        self._n = 0
        for t, cands in pool.items():
            for c in cands:
                self._candidate(t, c, spec)
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.node.extend(self.nodes)
        m.graph.initializer.extend(self.inits)
        del m.graph.output[:]
        m.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, [])
                              for o in self.outputs)
        self.model = m

    def _name(self, kind: str) -> str:
        self._n += 1
        return f"ranges::{kind}{self._n}"

    def _candidate(self, t: str, c: Candidate, spec: QuantSpec) -> None:
        scale, zero = spec.params(c.lo, c.hi)
        s, z, q, x = (self._name(k) for k in ("scale", "zero", "int", "x"))
        self.inits += [numpy_helper.from_array(scale.reshape(()), s),
                       numpy_helper.from_array(zero.reshape(()), z)]
        self.nodes += [helper.make_node("QuantizeLinear", [t, s, z], [q], name=self._name("q")),
                       helper.make_node("DequantizeLinear", [q, s, z], [x], name=self._name("dq"))]
        terms = []
        readers = [self.index.node(i) for i in self.index.readers(t)]
        plain = [r for r in readers if r.op_type not in _NOT_FLOAT and not any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in r.attribute)]
        if t in self.index.graph_outputs or not plain:
            terms.append((self._error(t, x), t))
        for r in plain:
            copy = onnx.NodeProto()
            copy.CopyFrom(r)
            copy.name = self._name("copy")
            for k, inp in enumerate(copy.input):
                if inp == t:
                    copy.input[k] = x
            outs = [self._name("y") if o else "" for o in r.output]
            del copy.output[:]
            copy.output.extend(outs)
            self.nodes.append(copy)
            terms.append((self._error(r.output[0], outs[0]), r.output[0]))
        self.consumers[t] = len(terms)
        self.terms[(t, c.kind)] = terms

    def _error(self, reference: str, candidate: str) -> str:
        if reference not in self.signal:
            out = self._name("signal")
            self.nodes.append(helper.make_node("ReduceSumSquare", [reference], [out], name=out,
                                               keepdims=0))
            self.outputs.append(out)
            self.signal[reference] = out
        diff, out = self._name("diff"), self._name("noise")
        self.nodes += [helper.make_node("Sub", [reference, candidate], [diff], name=diff),
                       helper.make_node("ReduceSumSquare", [diff], [out], name=out, keepdims=0)]
        self.outputs.append(out)
        return out

    def run(self, batches: list[dict]) -> tuple[dict[str, float], int]:
        return summed_outputs(self.model, batches)

    def choose(self, t: str, sums: dict[str, float]) -> RangeChoice:
        scores = {}
        for c in self.pool[t]:
            score = 0.0
            for noise, ref in self.terms[(t, c.kind)]:
                signal = sums[self.signal[ref]]
                if signal > 0:
                    score += sums[noise] / signal
            scores[c.kind] = score if math.isfinite(score) else math.inf
        base = self.pool[t][0]
        best = min(self.pool[t][1:], key=lambda c: scores[c.kind], default=base)
        chosen = best if scores[best.kind] < (1 - MARGIN) * scores[base.kind] else base
        return RangeChoice(t, chosen, scores, self.consumers[t])
