"""Zero the weights that only ever multiply a dead (or constant) channel.

A channel c of a ReLU's input z is dead when z_c never exceeds 0, so Relu(z)_c is exactly 0
(ReLU6 as Clip(z, 0, 6) too):

- *observed*: max z_c <= 0 over the calibration data (measured statistics);
- *proven*: interval arithmetic from a stated input range bounds z_c <= 0 for every input in
  that range (per channel [lo, hi] through Conv/Gemm/MatMul (+bias), ReLU and monotone
  activations, pooling, Pad, BatchNormalization, Add/Sub/Mul with constants, Concat, Flatten;
  a zero-padded Conv also sees 0 at its borders).

A zero channel stays zero through Relu, max/average pooling, zero padding, Identity, Dropout
and Flatten/Reshape (where it becomes H*W zero features), so every Conv, Gemm or MatMul it
reaches multiplies it by weights that never matter: the consumer's slice for it (Conv: the
input-channel slice W[:, c] of c's group; Gemm/MatMul: the rows of c's features) is set to 0.
On merged Rep models those slices are where the outliers live: a dead input drives a merged
branch's BN variance to ~0, so its folded weights become ~gamma * w / sqrt(eps) (max |w| 1155
in a MobileOne trained here), which ruins per-tensor INT8 of the whole tensor while FP32 never
notices.

The same collapse leaves channels that are *constant* but not zero (a depthwise unit fed by a
dead channel outputs Relu(bias)); the next unit's identity branch then carries a ~1/sqrt(eps)
weight on it. A constant channel k (min = max over the data, or lo = hi proven) reaching a
consumer through shift-free ops (ReLU, max/global pooling, Identity, Flatten) is folded:
b[o] += sum over taps of W[o, c, ...] * k (times alpha for a Gemm) and the slice is zeroed,
exact only where the consumer does not pad (a padded border reads 0, not k), so padded
consumers and MatMul (no bias) keep those slices, with the reason. The function is unchanged
wherever the deadness or constancy holds (on the data when observed, on the input range when
proven).

Choice: only the consumer side is edited. The producer's weights and bias for the channel are
kept: zeroing them is exact only where its pre-activation bound is proven, and it would move a
negative pre-activation to 0, which the statistics of later passes then no longer describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxrep.analysis.statistics import Statistics
from onnxrep.ir.graph import GraphIndex, attr, is_onnx
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip
from onnxrep.ir.layers import add_to_bias, flatten_features, in_channels, padding
from onnxrep.ir.shapes import infer_shapes

# ops that map a zero channel to a zero channel at the same position
ZERO_KEEPING = {"Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Identity", "Dropout", "Pad", "Clip"}
# ops that map a channel constant at k to the same constant k (no padding of their own)
CONSTANT_KEEPING = {"Relu", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Identity",
                    "Dropout"}
FLAT_OPS = {"Relu", "LeakyRelu", "Identity", "Dropout"}  # elementwise, after a Flatten
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Interval:
    """Per-channel bounds (float64, one value per channel, or one for all channels)."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, lo, hi) -> "Interval":
        lo, hi = np.atleast_1d(np.asarray(lo, np.float64)), np.atleast_1d(np.asarray(hi,
                                                                                  np.float64))
        return cls(*np.broadcast_arrays(lo, hi))

    def widen_to_zero(self) -> "Interval":
        return Interval(np.minimum(self.lo, 0.0), np.maximum(self.hi, 0.0))

    def union(self, value: float) -> "Interval":
        return Interval(np.minimum(self.lo, value), np.maximum(self.hi, value))

    def sized(self, n: int) -> "Interval":
        return Interval(np.broadcast_to(self.lo, (n,)), np.broadcast_to(self.hi, (n,)))


InputBounds = tuple[float, float] | dict[str, Interval]


@dataclass(frozen=True)
class Constant:
    """Per channel of an activation's output: ``value`` where it is constant (NaN elsewhere;
    0 for a dead channel) and whether that is ``proven`` or only ``observed``."""

    value: np.ndarray
    proven: np.ndarray

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.value)

    @property
    def dead(self) -> np.ndarray:
        return self.value == 0

    def describe(self, mask: np.ndarray) -> str:
        p = int((mask & self.proven).sum())
        o = int((mask & ~self.proven).sum())
        nz = int((mask & ~self.dead).sum())
        parts = [f"{p} proven" if p else "", f"{o} observed" if o else "",
                 f"{nz} constant, folded into the bias" if nz else ""]
        return ", ".join(part for part in parts if part)


@dataclass
class DeadInputsSummary:
    dead: int = 0  # input channels always zero: weights reading them zeroed
    constant: int = 0  # input channels constant but not zero: folded into the bias
    proven: int = 0  # of those, proven by interval bounds
    observed: int = 0  # of those, only observed on the calibration data
    samples: int | None = None  # calibration samples observed, when data was given


class ZeroDeadInputs(Pass):
    """``stats``: measured statistics of the ReLU inputs (observed deadness); ``input_range``:
    (lo, hi) for every float input, or {input name: Interval} (proven deadness). Either or
    both; with neither the pass does nothing."""

    name = "dead-inputs"
    contract = Contract.EQUIVALENT_ON_DATA

    def __init__(self, stats: Statistics | None = None, input_range: InputBounds | None = None):
        self.stats, self.input_range = stats, input_range

    def statistics_after(self, result: PassResult) -> dict:
        """Weights that only multiply zeros, and constants moved into biases: every activation
        is the same on the calibration data (where deadness was observed or proven)."""
        return {}

    def call(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model.graph)
        shapes = infer_shapes(model)
        bounds = (propagate_intervals(model, _input_intervals(model, self.input_range, shapes),
                                      index, shapes) if self.input_range is not None else {})
        changes, skips = [], []
        totals = DeadInputsSummary()
        for i, node in enumerate(model.graph.node):
            if not zero_below(index, node):
                continue
            const = self._constants(index, node, bounds)
            found = const.found
            if not found.any():
                continue
            label = index.labels[i]
            held = self.held(label)
            if held:
                skips.append(held)
                continue
            totals.dead += int((found & const.dead).sum())
            totals.constant += int((found & ~const.dead).sum())
            totals.proven += int((found & const.proven).sum())
            totals.observed += int((found & ~const.proven).sum())
            for consumer, mask, problem in _plan(index, node.output[0], shapes, const):
                if problem:
                    skips.append(Skip(label, problem))
                if not mask.any():
                    continue
                removed = consumer.fold(index, mask, np.where(mask, const.value, 0.0))
                if removed > 0:
                    changes.append(Change(
                        "zeroed", (label, index.labels[consumer.node]),
                        f"input channels {_channels(np.flatnonzero(mask))} "
                        f"({const.describe(mask)}); max |w| removed {removed:.3g}"))
        if self.stats is not None:
            totals.samples = self.stats.samples
        return PassResult(model, changes, skips, totals)

    def _constants(self, index: GraphIndex, node: onnx.NodeProto,
                   bounds: dict[str, Interval]) -> Constant:
        """Constant output channels of activation ``node`` from its input's bounds/stats."""
        z = node.input[0]
        s = self.stats.get(z) if self.stats is not None else None
        iv = bounds.get(z)
        n = s.channels if s is not None else (iv.hi.size if iv is not None else 0)
        cap = _clip_bounds(index, node)[1] if node.op_type == "Clip" else np.inf
        proven = (_constant_output(iv.lo, iv.hi, cap) if iv is not None and iv.hi.size == n
                  else np.full(n, np.nan))
        observed = _constant_output(s.min, s.max, cap) if s is not None else np.full(n, np.nan)
        value = np.where(np.isnan(proven), observed, proven)
        return Constant(value, ~np.isnan(proven))


def _constant_output(lo: np.ndarray, hi: np.ndarray, cap: float) -> np.ndarray:
    """Clip(z, 0, cap) per channel when it is constant over z in [lo, hi], else NaN."""
    out = np.full(lo.shape, np.nan)
    out[hi <= 0] = 0.0
    out[lo >= cap] = cap
    same = (lo == hi) & np.isnan(out)
    out[same] = np.clip(lo[same], 0.0, cap)
    return out


def zero_below(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """True for activations that output exactly 0 wherever their input is <= 0: Relu, and
    Clip with a constant lower bound of 0 (ReLU6)."""
    if not is_onnx(node) or not node.input:
        return False
    if node.op_type == "Relu":
        return True
    bounds = _clip_bounds(index, node) if node.op_type == "Clip" else None
    return bounds is not None and bounds[0] == 0 and bounds[1] >= 0


def _channels(idx: np.ndarray, limit: int = 12) -> str:
    text = ", ".join(str(int(c)) for c in idx[:limit])
    return text + (f", ... ({idx.size} in all)" if idx.size > limit else "")


# ---- consumers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Consumer:
    """A weight layer reading the channels; ``features`` per channel (H*W after a Flatten,
    1 for a Conv or a rank-2 input)."""

    node: int
    features: int

    def channels(self, index: GraphIndex) -> int:
        node = index.node(self.node)
        return in_channels(node, index.const_info(node.input[1])[1]) // self.features

    def fold(self, index: GraphIndex, mask: np.ndarray, values: np.ndarray) -> float:
        """Zero the weight slice reading the ``mask`` channels, adding their constant
        ``values`` times the weights to the bias; returns the max |w| removed."""
        node = index.node(self.node)
        w = index.const(node.input[1]).copy()
        w64 = w.astype(np.float64)
        if node.op_type == "Conv":
            g = int(attr(node, "group", 1))
            cout, cin_g = w.shape[0], w.shape[1]
            view = w.reshape((g, cout // g, cin_g) + w.shape[2:])
            taps = w64.reshape(g, cout // g, cin_g, -1)
            m = mask.reshape(g, cin_g)
            removed = max((float(np.abs(taps[gi, :, j]).max(initial=0.0))
                           for gi, j in zip(*np.nonzero(m))), default=0.0)
            delta = np.einsum("goj,gj->go", taps.sum(axis=3),
                              values.reshape(g, cin_g)).reshape(cout)
            for gi, j in zip(*np.nonzero(m)):
                view[gi, :, j] = 0
        else:
            rows = np.repeat(mask, self.features)
            transposed = node.op_type == "Gemm" and attr(node, "transB", 0)
            wk = w64.T if transposed else w64  # [K, N]
            removed = float(np.abs(wk[rows]).max(initial=0.0))
            delta = float(attr(node, "alpha", 1.0)) * (np.repeat(values, self.features) @ wk)
            if transposed:
                w[:, rows] = 0
            else:
                w[rows] = 0
        if removed > 0:
            index.set_const(node.input[1], w)
        if np.any(delta != 0):
            add_to_bias(index, node, delta)
        return removed


def _plan(index: GraphIndex, tensor: str, shapes: dict, const: Constant
          ) -> list[tuple[Consumer, np.ndarray, str | None]]:
    """(consumer, channels to fold into it, why some were left) for every weight layer the
    constant channels of ``tensor`` reach."""
    found = const.found
    zero = found & const.dead
    nonzero = found & ~const.dead
    plans: dict[int, list] = {}
    problems: list[str] = []
    for strict, mask in ((False, zero), (True, nonzero)):
        if not mask.any():
            continue
        consumers, why = zero_consumers(index, tensor, shapes, strict=strict)
        problems += why
        for c in consumers:
            entry = plans.setdefault(c.node, [c, np.zeros(found.size, bool)])
            entry[1] = entry[1] | mask
    out = [(None, np.zeros(found.size, bool), p) for p in problems]
    for c, mask in plans.values():
        have = c.channels(index)
        if have != found.size:
            out.append((c, np.zeros(found.size, bool), f"{index.labels[c.node]} reads {have} "
                        f"channels, the activation has {found.size}"))
        else:
            out.append((c, mask, None))
    return out


def zero_consumers(index: GraphIndex, tensor: str, shapes: dict, strict: bool = False
                   ) -> tuple[list[Consumer], list[str]]:
    """Weight layers a zero channel (``strict``: a constant one) of ``tensor`` reaches through
    ops that keep it, and the reasons for layers it reaches that cannot be edited."""
    keeping = CONSTANT_KEEPING if strict else ZERO_KEEPING
    found: dict[int, Consumer] = {}
    problems: list[str] = []
    stack = [(tensor, 1, False)]
    seen = set()
    while stack:
        t, features, flat = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for r in index.readers(t):
            node = index.node(r)
            label = f"{node.op_type} '{index.labels[r]}'"
            if not is_onnx(node):
                continue
            if node.op_type in WEIGHT_OPS:
                problem = _consumer_problem(index, r, t, flat, shapes, strict)
                if problem:
                    problems.append(f"{label}: {problem}")
                else:
                    found[r] = Consumer(r, features)
            elif node.op_type in ("Flatten", "Reshape") and not flat:
                hw, _ = flatten_features(node, t, shapes)
                if hw is not None:
                    stack.append((node.output[0], hw, True))
            elif (node.op_type in keeping and (not flat or node.op_type in FLAT_OPS)
                  and _keeps(index, node, strict)):
                stack.append((node.output[0], features, flat))
    return sorted(found.values(), key=lambda c: c.node), problems


def _keeps(index: GraphIndex, node: onnx.NodeProto, strict: bool) -> bool:
    if strict:  # CONSTANT_KEEPING ops map k >= 0 to k (MaxPool's padding is -inf)
        return True
    if node.op_type == "Clip":
        bounds = _clip_bounds(index, node)
        return bounds is not None and bounds[0] <= 0 <= bounds[1]
    if node.op_type == "Pad":
        pads = index.const(node.input[1]) if len(node.input) > 1 else attr(node, "pads")
        if pads is None or (len(node.input) > 3 and node.input[3]):
            return False
        pads = np.asarray(pads)
        rank = len(pads) // 2
        if rank < 2 or pads[1] != 0 or pads[rank + 1] != 0:
            return False
        if attr(node, "mode", b"constant") != b"constant":
            return True
        value = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        return value is not None and float(np.max(np.abs(value))) == 0.0
    return True


def _consumer_problem(index: GraphIndex, i: int, tensor: str, flat: bool, shapes: dict,
                      strict: bool) -> str | None:
    node = index.node(i)
    if node.input[0] != tensor:
        return "reads the channel as its weight"
    if len(node.input) < 2 or not index.is_const(node.input[1]):
        return "its weight is not a constant"
    if index.shared(node.input[1]):
        return f"its weight is shared by {len(index.readers(node.input[1]))} nodes"
    w = index.const(node.input[1])
    if node.op_type == "Conv":
        if flat:
            return "reads flattened features"
    elif node.op_type == "Gemm" and attr(node, "transA", 0):
        return "transA=1"
    elif w.ndim != 2:
        return "its weight is not a matrix"
    elif not flat and len(shapes.get(tensor, ())) != 2:
        return "does not contract the channel axis (no Flatten before it)"
    if not strict:
        return None
    if node.op_type == "MatMul":
        return "constant channels need a bias to fold into; MatMul has none"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (not index.is_const(bias) or index.shared(bias)):
        return "constant channels need a bias of its own to fold into"
    if node.op_type == "Conv" and padding(node):
        return "pads its input: a constant channel would read 0 at the border, so it is kept"
    return None


# ---- interval propagation ---------------------------------------------------------------------

def _input_intervals(model: onnx.ModelProto, bounds: InputBounds, shapes: dict
                     ) -> dict[str, Interval]:
    if isinstance(bounds, dict):
        return dict(bounds)
    lo, hi = bounds
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name not in inits and v.type.tensor_type.elem_type in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            out[v.name] = Interval.of(lo, hi)
    return out


def propagate_intervals(model: onnx.ModelProto, inputs: dict[str, Interval],
                        index: GraphIndex | None = None, shapes: dict | None = None
                        ) -> dict[str, Interval]:
    """Per-channel bounds of every tensor reachable from ``inputs`` through supported ops
    (graph order is topological); a tensor missing from the result is unbounded."""
    index = index or GraphIndex(model.graph)
    shapes = shapes if shapes is not None else infer_shapes(model)
    known = dict(inputs)
    for node in model.graph.node:
        if not is_onnx(node) or not node.output or not node.input:
            continue
        rule = _RULES.get(node.op_type)
        if rule is None or node.input[0] not in known:
            continue
        try:
            with np.errstate(all="ignore"):
                out = rule(node, known[node.input[0]], index, known, shapes)
        except ValueError:  # channel counts that do not line up: leave it unbounded
            out = None
        if out is not None and np.all(out.lo <= out.hi):
            known[node.output[0]] = out
    return known


def _affine_bound(w: np.ndarray, x: Interval) -> Interval:
    """Bounds of sum_j w[o, j] * x_j for x_j in [lo_j, hi_j]; w: [O, J] float64."""
    x = x.sized(w.shape[1])
    pos, neg = np.maximum(w, 0.0), np.minimum(w, 0.0)
    with np.errstate(invalid="ignore"):
        hi = _dot(pos, x.hi) + _dot(neg, x.lo)
        lo = _dot(pos, x.lo) + _dot(neg, x.hi)
    return Interval(np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi))


def _dot(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """w @ v with 0 * inf = 0 (a zero weight ignores an unbounded input)."""
    finite = np.isfinite(v)
    out = w @ np.where(finite, v, 0.0)
    if not finite.all():
        inf_part = (w[:, ~finite] * v[~finite]).sum(axis=1, where=w[:, ~finite] != 0)
        out = out + inf_part
    return out


def _conv(node, x, index, known, shapes) -> Interval | None:
    w = index.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim < 3:
        return None
    w = w.astype(np.float64)
    g = int(attr(node, "group", 1))
    cout, cin_g = w.shape[0], w.shape[1]
    if padding(node):
        x = x.widen_to_zero()  # border taps read the zero padding
    x = x.sized(cin_g * g)
    taps_pos = np.maximum(w, 0).reshape(cout, cin_g, -1).sum(axis=2)
    taps_neg = np.minimum(w, 0).reshape(cout, cin_g, -1).sum(axis=2)
    lo, hi = np.empty(cout), np.empty(cout)
    per = cout // g
    for gi in range(g):
        rows = slice(gi * per, (gi + 1) * per)
        xs = Interval(x.lo[gi * cin_g:(gi + 1) * cin_g], x.hi[gi * cin_g:(gi + 1) * cin_g])
        a = _affine_bound(taps_pos[rows], xs)
        b = _affine_bound(taps_neg[rows], xs)
        lo[rows], hi[rows] = a.lo + b.lo, a.hi + b.hi
    return _plus_bias(Interval(lo, hi), index, node, 2)


def _plus_bias(iv: Interval, index: GraphIndex, node, slot: int, scale: float = 1.0
               ) -> Interval | None:
    if len(node.input) <= slot or not node.input[slot]:
        return iv
    b = index.const(node.input[slot])
    if b is None:
        return None
    b = np.asarray(b, np.float64) * scale
    b_lo = b.reshape(-1, b.shape[-1]).min(axis=0) if b.ndim == 2 else b.reshape(-1)
    b_hi = b.reshape(-1, b.shape[-1]).max(axis=0) if b.ndim == 2 else b.reshape(-1)
    return Interval(iv.lo + b_lo, iv.hi + b_hi)


def _gemm(node, x, index, known, shapes) -> Interval | None:
    w = index.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim != 2 or (node.op_type == "Gemm" and attr(node, "transA", 0)):
        return None
    w = w.astype(np.float64)
    if node.op_type == "Gemm":
        w = (w if attr(node, "transB", 0) else w.T) * float(attr(node, "alpha", 1.0))
        return _plus_bias(_affine_bound(w, x), index, node, 2, float(attr(node, "beta", 1.0)))
    rank = len(shapes.get(node.input[0], ()))
    return _affine_bound(w.T, x) if rank == 2 else None


def _monotone(fn):
    def rule(node, x, index, known, shapes):
        return Interval(fn(node, x.lo, index), fn(node, x.hi, index))
    return rule


def _clip_bounds(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """Clip's (min, max) from constant inputs (opset >= 11) or attributes; None if dynamic."""
    out = []
    for slot, name, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.input) > slot and node.input[slot]:
            c = index.const(node.input[slot])
            if c is None:
                return None
            out.append(float(np.asarray(c).reshape(-1)[0]))
        else:
            out.append(float(attr(node, name, default)))
    return out[0], out[1]


def _clip(node, x, index, known, shapes):
    bounds = _clip_bounds(index, node)
    return None if bounds is None else Interval(np.clip(x.lo, *bounds), np.clip(x.hi, *bounds))


def _leaky_fn(node, v, index):
    alpha = float(attr(node, "alpha", 0.01))
    return np.where(v >= 0, v, v * alpha) if alpha >= 0 else np.full_like(v, np.nan)


def _same(node, x, index, known, shapes):
    return x


def _avg_pool(node, x, index, known, shapes):
    pads = attr(node, "pads", None)
    padded = (pads is not None and any(pads)) or attr(node, "auto_pad", b"NOTSET") != b"NOTSET"
    return x.widen_to_zero() if padded and attr(node, "count_include_pad", 0) else x


def _pad(node, x, index, known, shapes):
    pads = index.const(node.input[1]) if len(node.input) > 1 else attr(node, "pads")
    if pads is None or (len(node.input) > 3 and node.input[3]):
        return None
    pads = np.asarray(pads)
    rank = len(pads) // 2
    if rank < 2 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return None
    if attr(node, "mode", b"constant") != b"constant" or not np.any(pads):
        return x
    value = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(
        node, "value", 0.0)
    return None if value is None else x.union(float(np.asarray(value).reshape(-1)[0]))


def _flatten(node, x, index, known, shapes):
    hw, _ = flatten_features(node, node.input[0], shapes)
    c = shapes.get(node.input[0], (None, None))[1]
    if hw is None or c is None:
        return None
    x = x.sized(c)
    return Interval(np.repeat(x.lo, hw), np.repeat(x.hi, hw))


def _channel_const(index: GraphIndex, name: str, rank: int | None) -> Interval | None:
    """A constant broadcast against an [N, C, ...] tensor, as per-channel bounds."""
    c = index.const(name)
    if c is None or rank is None or c.ndim > rank:
        return None
    c = np.asarray(c, np.float64)
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for d in c.shape[:1]):
        return None
    flat = np.moveaxis(c, 1, 0).reshape(c.shape[1], -1)
    return Interval(flat.min(axis=1), flat.max(axis=1))


def _binary(node, x, index, known, shapes):
    if len(node.input) != 2:
        return None
    other = node.input[1]
    y = known.get(other) or _channel_const(index, other, len(shapes.get(node.input[0], ())) or
                                           None)
    if y is None:
        return None
    try:
        n = np.broadcast_shapes(x.lo.shape, y.lo.shape)
    except ValueError:
        return None
    x, y = x.sized(n[0]), y.sized(n[0])
    if node.op_type == "Add":
        return Interval(x.lo + y.lo, x.hi + y.hi)
    if node.op_type == "Sub":
        return Interval(x.lo - y.hi, x.hi - y.lo)
    with np.errstate(invalid="ignore"):
        corners = np.stack([x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi])
    if np.isnan(corners).any():
        return None
    return Interval(corners.min(axis=0), corners.max(axis=0))


def _batchnorm(node, x, index, known, shapes):
    params = [index.const(n) for n in node.input[1:5]] if len(node.input) >= 5 else [None]
    if any(p is None for p in params) or attr(node, "training_mode", 0):
        return None
    gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    s = gamma / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    x = x.sized(s.size)
    a, b = s * x.lo + beta - mean * s, s * x.hi + beta - mean * s
    return Interval(np.minimum(a, b), np.maximum(a, b))


def _concat(node, x, index, known, shapes):
    rank = len(shapes.get(node.input[0], ()))
    axis = int(attr(node, "axis", 1))
    if rank < 2 or axis not in (1, 1 - rank) or not all(n in known for n in node.input):
        return None
    parts = []
    for name in node.input:
        c = (shapes.get(name) or (None, None))[1]
        if c is None:
            return None
        parts.append(known[name].sized(c))
    return Interval(np.concatenate([p.lo for p in parts]), np.concatenate([p.hi for p in parts]))


_RULES = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _gemm,
    "Relu": _monotone(lambda node, v, index: np.maximum(v, 0.0)),
    "LeakyRelu": _monotone(_leaky_fn), "Clip": _clip,
    "Sigmoid": _monotone(lambda node, v, index: 1 / (1 + np.exp(-v))),
    "Tanh": _monotone(lambda node, v, index: np.tanh(v)),
    "MaxPool": _same, "GlobalMaxPool": _same, "GlobalAveragePool": _same,
    "Identity": _same, "Dropout": _same, "AveragePool": _avg_pool, "Pad": _pad,
    "Flatten": _flatten, "Reshape": _flatten, "Add": _binary, "Sub": _binary, "Mul": _binary,
    "BatchNormalization": _batchnorm, "Concat": _concat,
}


def input_bounds_from_stats(model: onnx.ModelProto, stats: Statistics) -> dict[str, Interval]:
    """Per-channel [min, max] of each graph input over the calibration data."""
    inits = {t.name for t in model.graph.initializer}
    return {v.name: Interval.of(stats[v.name].min, stats[v.name].max)
            for v in model.graph.input if v.name not in inits and v.name in stats}
