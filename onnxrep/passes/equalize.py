"""Cross-layer equalization (Nagel et al. 2019, arXiv 1906.04721, section 4.1).

For two layers joined by ops that commute with a positive per-channel scale,
``y = W2 f(W1 x + b1)`` with ``f(s * z) = s * f(z)`` for ``s > 0`` (ReLU, LeakyReLU, PReLU,
max/average pooling, zero padding, identity), scaling output channel ``i`` of ``W1`` and ``b1``
by ``1/s_i`` and input channel ``i`` of ``W2`` by ``s_i`` leaves ``y`` unchanged. With
``r1_i`` = max |W1| over output channel ``i`` and ``r2_i`` = max |W2| over everything that
reads channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i * r2_i)``.

Pairs chain (conv -> depthwise -> conv is the paper's triplet), so rounds repeat until no
channel moves by more than ``tolerance``; each chain's uniform mismatch is first removed in one
linear solve, the mode plain rounds are slowest on. Scales accumulate in float64 over
the reduced matrices ``R[o, i] = max |W[o, i, ...]|`` (scaling commutes with the max), and
each weight is rewritten once at the end. Grouped and depthwise convolutions (any depth multiplier) map input
channel ``c`` to the rows of its group; a Flatten/Reshape into Gemm/MatMul maps channel ``c``
to its ``H*W`` features. Dead or near-dead channels (a range of zero) are left unscaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxrep.analysis.weights import CHANNEL_SQNR_SAMPLES, channel_sqnr, sample_positions
from onnxrep.ir.graph import GraphIndex, attr, is_onnx
from onnxrep.ir.layers import flatten_features
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip
from onnxrep.ir.shapes import infer_shapes

# Ops through which a positive per-channel scale passes unchanged (f(s*x) = s*f(x)).
CHANNEL_OPS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool", "Pad", "Identity"}
# Elementwise ops allowed after a Flatten/Reshape, where channels have become features.
FEATURE_OPS = {"Relu", "LeakyRelu", "Identity"}
_WHY_NOT = {
    "Clip": "Clip (ReLU6) clamps at a fixed bound, which a scale would move",
    "Add": "Add (a residual) mixes two branches that would need the same scale",
    "Sum": "Sum mixes branches that would need the same scale",
    "Concat": "Concat mixes branches",
    "Mul": "Mul (e.g. an SE gate or HardSwish) is not positively homogeneous in its input",
    "HardSwish": "HardSwish is not positively homogeneous",
    "HardSigmoid": "HardSigmoid is not positively homogeneous",
    "Sigmoid": "Sigmoid is not positively homogeneous",
    "Swish": "SiLU is not positively homogeneous",
    "Tanh": "Tanh is not positively homogeneous",
    "BatchNormalization": "BatchNormalization follows; fold it first",
}
_DEAD = 1e-7  # relative range under which a channel counts as dead


@dataclass(frozen=True)
class EqualizeConfig:
    """``iterations``: maximum rounds; ``tolerance``: stop (and leave a channel alone) when
    every scale is within a factor 1 + tolerance of 1; ``threshold``: leave a channel
    unscaled when r1 + r2 is below it (TinyNeuralNetwork's knob against blowing small
    activations up); ``max_scale``: clamp on each round's scale, s in [1/max_scale,
    max_scale]; ``relaxation``: apply s ** relaxation (successive over-relaxation; 1.0 makes
    a single pair exact in one round; chain balancing with over-relaxation converges in far
    fewer rounds than plain pairwise rounds: the README gives the counts); ``never_worse``:
    keep a pair's scales only when they do not lower the per-tensor INT8 weight SQNR summed
    over its two layers (off: plain CLE, every pair equalized)."""

    iterations: int = 100
    tolerance: float = 1e-2
    threshold: float = 0.0
    max_scale: float = 1e4
    relaxation: float = 1.3
    never_worse: bool = True

    def __post_init__(self):
        if self.iterations < 0 or self.tolerance < 0 or self.threshold < 0 or self.max_scale < 1:
            raise ValueError("iterations, tolerance and threshold must be >= 0, max_scale >= 1")


@dataclass
class _Layer:
    """A weight layer reduced to ``R[o, j] = max |W[o, j, ...]|`` plus accumulated scales."""

    node: int
    weight: str
    bias: str | None
    op: str
    groups: int
    R: np.ndarray  # (out, in_per_group) in the weight's dtype; exact, as max commutes with scaling
    sample: tuple[np.ndarray, np.ndarray, np.ndarray]  # strided weights, their out and in channels
    features: int = 1  # features per input channel (H*W after a Flatten), Gemm/MatMul only
    out_factor: np.ndarray = field(init=False)
    in_factor: np.ndarray = field(init=False)

    def __post_init__(self):
        self.out_factor = np.ones(self.R.shape[0])
        self.in_factor = np.ones(self.R.shape[1] * self.groups)

    def int8_sqnr(self) -> float:
        """:func:`onnxrep.analysis.weights.channel_sqnr` of the weight as the factors would
        scale it, the step from the exact scaled max (out_ranges). The whole-tensor SQNR is
        dominated by the largest channel and stays high while an outlier channel rounds every
        other channel to zero; the mean over channels sees that."""
        ranges = self.out_ranges()
        values, out, inp = self.sample
        return channel_sqnr(values * self.out_factor[out] * self.in_factor[inp], out,
                            ranges.size, float(ranges.max(initial=0.0)))

    def _grouped(self) -> tuple[np.ndarray, int, int]:
        g, (cout, cin_g) = self.groups, self.R.shape
        return self.R.reshape(g, cout // g, cin_g), cout // g, cin_g

    def out_ranges(self) -> np.ndarray:
        r, _, cin_g = self._grouped()
        scaled = r * self.in_factor.astype(r.dtype).reshape(self.groups, 1, cin_g)
        return scaled.max(axis=2).reshape(-1) * self.out_factor

    def in_ranges(self) -> np.ndarray:
        r, cout_g, _ = self._grouped()
        scaled = r * self.out_factor.astype(r.dtype).reshape(self.groups, cout_g, 1)
        return scaled.max(axis=1).reshape(-1) * self.in_factor


@dataclass(frozen=True)
class ChainPair:
    """``first`` feeds ``second`` through ``path`` (node indices)."""

    first: int
    second: int
    path: tuple[int, ...]
    features: int = 1


@dataclass(frozen=True)
class EqualizeSummary:
    pairs: int  # layer pairs found
    rounds: int  # rounds run
    converged: bool


class EqualizeCrossLayer(Pass):
    name = "equalize"
    contract = Contract.EQUIVALENT

    def __init__(self, config: EqualizeConfig | None = None):
        self.config = config or EqualizeConfig()

    def call(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model.graph)
        found, skips = find_pairs(model, index)
        pairs = []
        for pair in found:
            held = self.held(index.labels[pair.first])
            if held:
                skips.append(held)
            else:
                pairs.append(pair)
        layers = _load_layers(index, pairs)
        totals, rounds, converged = _equalize(layers, pairs, self.config)
        if self.config.never_worse:
            undone = _keep_gains(index, layers, pairs, totals)
            skips += undone
            converged = converged and not undone  # the kept pairs' neighbours moved back
        changes = []
        for pair, total in zip(pairs, totals):
            moved = np.abs(np.log(total)) > 0
            if moved.any():
                changes.append(Change(
                    "equalized", (index.labels[pair.first], index.labels[pair.second]),
                    f"{int(moved.sum())}/{total.size} channels, s in "
                    f"[{total.min():.3g}, {total.max():.3g}]"))
        for layer in layers.values():
            _write_back(index, layer)
        self._scaled = _scaled_tensors(index, pairs, totals)
        return PassResult(model, changes, skips, EqualizeSummary(len(pairs), rounds, converged))

    def statistics_after(self, result: PassResult) -> dict:
        """The channels it scaled: the first layers' outputs and their paths (exact)."""
        return self._scaled


def _scaled_tensors(index: GraphIndex, pairs: list[ChainPair], totals: list[np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Tensor -> factor per channel for what equalization scaled: the first layer's output and
    every tensor on the path to the second layer carry channel i times 1/s_i (per feature,
    s_i repeated H*W times, after a Flatten); everything else is unchanged."""
    scaled = {}
    for pair, total in zip(pairs, totals):
        if np.all(total == 1):
            continue
        factor = 1.0 / total
        scaled[index.node(pair.first).output[0]] = factor
        for j in pair.path:
            node = index.node(j)
            if node.op_type in ("Flatten", "Reshape"):
                factor = np.repeat(factor, pair.features)
            scaled[node.output[0]] = factor
    return scaled


def find_pairs(model: onnx.ModelProto, index: GraphIndex | None = None
               ) -> tuple[list[ChainPair], list[Skip]]:
    """Every equalizable (layer, layer) pair, and for each other layer the reason it is not."""
    index = index or GraphIndex(model.graph)
    finder = _ChainFinder(model, index)
    pairs, skips = [], []
    for i, node in enumerate(model.graph.node):
        if is_onnx(node) and node.op_type == "ConvTranspose":
            skips.append(Skip(index.labels[i], "ConvTranspose is not equalized: this pass scales "
                              "Conv, Gemm and MatMul channels only"))
            continue
        if not is_onnx(node) or node.op_type not in ("Conv", "Gemm"):
            continue
        reason = _first_layer_problem(index, i)
        if reason is None:
            found = finder.follow(i)
            if isinstance(found, ChainPair):
                pairs.append(found)
                continue
            reason = found
        skips.append(Skip(index.labels[i], reason))
    return pairs, skips


def _first_layer_problem(index: GraphIndex, i: int) -> str | None:
    node = index.node(i)
    problem = _weight_problem(index, node, 1)
    if problem:
        return problem
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if not index.is_const(bias):
            return f"bias '{bias}' is not a constant"
        if index.shared(bias):
            return f"bias '{bias}' is shared by {len(index.readers(bias))} nodes"
        if node.op_type == "Gemm":
            outputs = index.const_info(node.input[1])[1][0 if attr(node, "transB", 0) else 1]
            if int(np.prod(index.const_info(bias)[1])) != outputs:
                return "Gemm bias is not one value per output feature"
    return None


def _weight_problem(index: GraphIndex, node: onnx.NodeProto, slot: int) -> str | None:
    if len(node.input) <= slot or not node.input[slot]:
        return "has no weight input"
    name = node.input[slot]
    if not index.is_const(name):
        return f"weight '{name}' is not a constant"
    if index.shared(name):
        return f"weight '{name}' is shared by {len(index.readers(name))} nodes"
    dtype = index.const_info(name)[0]
    if dtype not in (np.float32, np.float64, np.float16):
        return f"weight '{name}' has dtype {dtype}, not float"
    return None


class _ChainFinder:
    def __init__(self, model: onnx.ModelProto, index: GraphIndex):
        self.model = model
        self.index = index
        self._shapes: dict | None = None

    def shapes(self) -> dict:
        if self._shapes is None:
            self._shapes = infer_shapes(self.model)
        return self._shapes

    def follow(self, first: int) -> ChainPair | str:
        """Walk from ``first``'s output to the next layer; a reason string when it cannot."""
        index = self.index
        tensor = index.node(first).output[0]
        path: list[int] = []
        features = None  # set once channels become features (after Flatten/Reshape)
        while True:
            if tensor in index.graph_outputs:
                return f"'{tensor}' is a graph output"
            readers = index.readers(tensor)
            if not readers:
                return f"'{tensor}' is not used"
            if len(readers) > 1:
                return f"'{tensor}' is read by {len(readers)} nodes (fan-out ends the chain)"
            nxt = readers[0]
            node = index.node(nxt)
            label = f"{node.op_type} '{index.labels[nxt]}'"
            if not is_onnx(node):
                return f"{label} is a custom-domain op"
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                problem = self._second_layer_problem(first, nxt, tensor, features)
                return problem or ChainPair(first, nxt, tuple(path), features or 1)
            if features is None and node.op_type in CHANNEL_OPS:
                problem = self._channel_op_problem(node)
            elif features is not None and node.op_type in FEATURE_OPS:
                problem = None
            elif features is None and node.op_type in ("Flatten", "Reshape"):
                features, problem = self._flatten(first, node, tensor)
            else:
                problem = _WHY_NOT.get(node.op_type, "does not commute with a per-channel scale")
            if problem:
                return f"{label}: {problem}"
            if any(out and index.readers(out) for out in node.output[1:]):
                return f"{label}: its second output is used"
            path.append(nxt)
            tensor = node.output[0]

    def _channel_op_problem(self, node: onnx.NodeProto) -> str | None:
        if node.op_type != "Pad":
            return None
        if attr(node, "mode", b"constant") not in (b"constant", b"reflect", b"edge", b"wrap"):
            return "unknown padding mode"
        if len(node.input) > 3 and node.input[3]:
            return "Pad with an axes input"
        pads = self.index.const(node.input[1]) if len(node.input) > 1 else None
        if pads is None:
            return "pads are not constant"
        rank = len(pads) // 2
        if rank < 2 or pads[1] != 0 or pads[rank + 1] != 0 or pads[0] != 0 or pads[rank] != 0:
            return "pads the batch or channel axis"
        if attr(node, "mode", b"constant") == b"constant" and len(node.input) > 2 and node.input[2]:
            value = self.index.const(node.input[2])
            if value is None or np.any(value != 0):
                return "pads with a non-zero constant"
        return None

    def _flatten(self, first: int, node: onnx.NodeProto, tensor: str) -> tuple[int | None, str | None]:
        if self.index.node(first).op_type != "Conv":
            return None, "reshapes a 2-D feature tensor"
        return flatten_features(node, tensor, self.shapes())

    def _second_layer_problem(self, first: int, second: int, tensor: str,
                              features: int | None) -> str | None:
        index = self.index
        node = index.node(second)
        label = f"{node.op_type} '{index.labels[second]}'"
        if node.input[0] != tensor:
            return f"{label} reads the chain as its weight, not its data input"
        problem = _weight_problem(index, node, 1)
        if problem:
            return f"{label}: {problem}"
        w_rank = len(index.const_info(node.input[1])[1])
        first_node = index.node(first)
        if node.op_type == "Conv":
            if features is not None:
                return f"{label} after a Flatten"
            return None
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return f"{label} has transA=1"
        if node.op_type == "MatMul" and (w_rank != 2 or (first_node.op_type == "Conv"
                                                         and features is None)):
            return f"{label} does not contract the channel axis"
        if first_node.op_type == "Conv" and features is None:
            return f"{label} reads a conv output without a Flatten"
        return None


def _load_layers(index: GraphIndex, pairs: list[ChainPair]) -> dict[int, _Layer]:
    layers: dict[int, _Layer] = {}
    for pair in pairs:
        for i, features in ((pair.first, 1), (pair.second, pair.features)):
            if i not in layers:
                layers[i] = _reduce(index, i, features)
    return layers


def _reduce(index: GraphIndex, i: int, features: int) -> _Layer:
    node = index.node(i)
    signed = index.const(node.input[1])
    w = np.abs(signed)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    flat = signed.reshape(-1)
    at = sample_positions(flat.size, CHANNEL_SQNR_SAMPLES)
    values = flat[at].astype(np.float64)
    if node.op_type == "Conv":
        r = w.reshape(w.shape[0], w.shape[1], -1).max(axis=2)
        g, (cout, cin_g) = int(attr(node, "group", 1)), r.shape
        taps = flat.size // (cout * cin_g)
        out = at // (cin_g * taps)
        inp = (out // (cout // g)) * cin_g + (at // taps) % cin_g
        return _Layer(i, node.input[1], bias, "Conv", g, r,
                      (values, out.astype(np.int32), inp.astype(np.int32)))
    transposed = node.op_type == "Gemm" and attr(node, "transB", 0)
    if transposed:
        w = w.T  # to [K, N]
    k_size, n_size = w.shape
    k, out = (at % k_size, at // k_size) if transposed else (at // n_size, at % n_size)
    r = w.reshape(-1, features, w.shape[1]).max(axis=1).T  # [N, channels]
    return _Layer(i, node.input[1], bias, node.op_type, 1, np.ascontiguousarray(r),
                  (values, out.astype(np.int32), (k // features).astype(np.int32)), features)


def _equalize(layers: dict[int, _Layer], pairs: list[ChainPair], config: EqualizeConfig
              ) -> tuple[list[np.ndarray], int, bool]:
    totals = [np.ones(layers[p.first].R.shape[0]) for p in pairs]
    for chain in _chains(pairs):
        _balance(layers, [pairs[k] for k in chain], config, [totals[k] for k in chain])
    log_tol = math.log1p(config.tolerance)
    rounds, converged = 0, not pairs
    while rounds < config.iterations and not converged:
        rounds += 1
        worst = 0.0
        for k, pair in enumerate(pairs):
            first, second = layers[pair.first], layers[pair.second]
            s = channel_scales(first.out_ranges(), second.in_ranges(), config)
            moved = np.abs(np.log(s)) > log_tol
            worst = max(worst, float(np.abs(np.log(s[moved])).max(initial=0.0)))
            s = np.where(moved, s ** config.relaxation, 1.0)
            first.out_factor /= s
            second.in_factor *= s
            totals[k] *= s
        converged = worst <= log_tol
    return totals, rounds, converged


def _keep_gains(index: GraphIndex, layers: dict[int, _Layer], pairs: list[ChainPair],
                totals: list[np.ndarray]) -> list[Skip]:
    """Undo the pairs whose scales lower the per-tensor INT8 weight SQNR summed over the two
    layers they scale (Nagel et al.'s objective is the sum of per-channel precisions, not equal
    ranges), greedily until no undo raises it. Undoing pair k with total scale t multiplies
    W1's rows by t and W2's inputs by 1/t, so the model stays equivalent whichever pairs are
    kept. Partial scales (t ** a) were tried too: they raised this weight objective but lost
    accuracy on the shipped MobileOne, so a pair is kept whole or not at all."""
    original = {i: _unscaled(layer).int8_sqnr() for i, layer in layers.items()}
    now = {i: layer.int8_sqnr() for i, layer in layers.items()}
    undone: dict[int, float] = {}
    again = True
    while again:
        again = False
        for k, pair in enumerate(pairs):
            if k in undone or np.all(totals[k] == 1):
                continue
            a, b = layers[pair.first], layers[pair.second]
            _rescale(a, b, totals[k])
            sa, sb = a.int8_sqnr(), b.int8_sqnr()
            if sa + sb > now[pair.first] + now[pair.second] + 1e-6:
                undone[k] = now[pair.first] + now[pair.second]
                now[pair.first], now[pair.second] = sa, sb
                totals[k] = np.ones_like(totals[k])
                again = True
            else:
                _rescale(a, b, 1.0 / totals[k])
    return [Skip(index.labels[pairs[k].first], (
        f"equalizing it with {index.labels[pairs[k].second]} would lower their summed "
        f"per-tensor INT8 weight SQNR (mean over channels: {scaled:.1f} dB against "
        f"{original[pairs[k].first] + original[pairs[k].second]:.1f} dB unscaled); left "
        "unscaled")) for k, scaled in undone.items()]


def _rescale(first: _Layer, second: _Layer, c: np.ndarray) -> None:
    """Scale first's output channels by ``c`` and second's inputs by ``1 / c`` (equivalent)."""
    first.out_factor *= c
    second.in_factor /= c


def _unscaled(layer: _Layer) -> _Layer:
    plain = _Layer(layer.node, layer.weight, layer.bias, layer.op, layer.groups, layer.R,
                   layer.sample, layer.features)
    return plain


def _chains(pairs: list[ChainPair]) -> list[list[int]]:
    """Pair indices grouped into maximal chains (a pair's second layer is the next's first)."""
    by_first = {p.first: k for k, p in enumerate(pairs)}
    seconds = {p.second for p in pairs}
    chains = []
    for k, p in enumerate(pairs):
        if p.first in seconds:
            continue
        chain = [k]
        while pairs[chain[-1]].second in by_first:
            chain.append(by_first[pairs[chain[-1]].second])
        chains.append(chain)
    return chains


def _balance(layers: dict[int, _Layer], chain: list[ChainPair], config: EqualizeConfig,
             totals: list[np.ndarray]) -> None:
    """Remove a chain's uniform mismatch in one step, before the per-channel rounds.

    With d_k = log(max r1 / max r2) over the equalizable channels of boundary k, one scalar
    x_k per boundary shifts d_k by -2 x_k and both neighbours by +x_k (all ranges scale
    exactly under uniform scales), so solving the tridiagonal system
    2 x_k - x_(k-1) - x_(k+1) = d_k zeroes every d at once. Plain rounds diffuse this mode
    along the chain and need O(L^2) of them. Skipped when every d is within what the rounds
    accept (so a converged model is left alone and a second run changes nothing)."""
    d = np.zeros(len(chain))
    for k, pair in enumerate(chain):
        r1, r2 = layers[pair.first].out_ranges(), layers[pair.second].in_ranges()
        ok = _equalizable(r1, r2, config)
        if ok.any():
            d[k] = math.log(float(r1[ok].max()) / float(r2[ok].max()))
    if np.abs(d).max(initial=0.0) <= 2 * math.log1p(config.tolerance):
        return  # every boundary within tolerance, as in a converged model
    n = len(chain)
    laplacian = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    limit = math.log(config.max_scale)
    for pair, total, x in zip(chain, totals, np.linalg.solve(laplacian, d)):
        scale = math.exp(float(np.clip(x, -limit, limit)))
        layers[pair.first].out_factor /= scale
        layers[pair.second].in_factor *= scale
        total *= scale


def channel_scales(r1: np.ndarray, r2: np.ndarray, config: EqualizeConfig) -> np.ndarray:
    """``s = sqrt(r1 / r2)`` per channel in float64; 1 where a channel is dead, below the
    threshold or not finite; clamped to ``[1/max_scale, max_scale]``."""
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    ok = _equalizable(r1, r2, config)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(ok, np.sqrt(r1 / np.where(ok, r2, 1.0)), 1.0)
    return np.clip(s, 1.0 / config.max_scale, config.max_scale)


def _equalizable(r1: np.ndarray, r2: np.ndarray, config: EqualizeConfig) -> np.ndarray:
    """Channels with finite, live ranges on both sides and r1 + r2 above the threshold."""
    finite = np.isfinite(r1) & np.isfinite(r2)
    return finite & ~_dead(r1, finite) & ~_dead(r2, finite) & (r1 + r2 >= config.threshold)


def _dead(r: np.ndarray, finite: np.ndarray) -> np.ndarray:
    top = float(r[finite].max(initial=0.0))
    return r <= _DEAD * max(top, 1e-30)


def _write_back(index: GraphIndex, layer: _Layer) -> None:
    """Apply the accumulated float64 factors to the real weight (and bias) once, in place."""
    if np.all(layer.out_factor == 1) and np.all(layer.in_factor == 1):
        return
    node = index.node(layer.node)
    w = index.const(layer.weight)
    if layer.op == "Conv":
        cout, cin_g = w.shape[0], w.shape[1]
        g = layer.groups
        inf = np.broadcast_to(layer.in_factor.reshape(g, 1, cin_g),
                              (g, cout // g, cin_g)).reshape(cout, cin_g)
        factor = layer.out_factor[:, None] * inf
        w = w * factor.reshape(factor.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
    else:
        per_feature = np.repeat(layer.in_factor, layer.features)  # [K]
        if node.op_type == "Gemm" and attr(node, "transB", 0):  # [N, K]
            w = w * (layer.out_factor[:, None] * per_feature[None, :]).astype(w.dtype)
        else:  # [K, N]
            w = w * (per_feature[:, None] * layer.out_factor[None, :]).astype(w.dtype)
    index.set_const(layer.weight, w)
    if layer.bias is not None and np.any(layer.out_factor != 1):
        b = index.const(layer.bias).astype(np.float64)
        index.set_const(layer.bias, (b.reshape(-1) * layer.out_factor).reshape(b.shape))
