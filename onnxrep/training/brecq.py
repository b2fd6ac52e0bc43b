"""Block reconstruction of learned rounding (BRECQ, Li et al. 2021, arXiv 2102.05426).

AdaRound (:mod:`onnxrep.training.adaround`) fits each layer's pre-activation output on its
own. BRECQ fits the output of a block of layers together, so the rounding of the first layer
can make up for the activation and activation quantization that follow it. A block here is two
weight layers L1, L2 of the QDQ model joined by what lies between them,

    L1 -> [Q -> DQ] -> activation (HardSwish, HardSigmoid, Relu, Clip, Sigmoid * x, GELU's
          Div / Erf / Add / Mul, ...) -> [Q -> DQ] -> L2,

where every node in between reads only L1's output, each other's outputs and constants, and
only L2 (as its data input) reads the result: a merged Rep unit with its activation
(conv -> HardSwish -> conv, MobileOne's depthwise -> pointwise), the squeeze/excite pair of an
SE block (1x1 conv -> act -> 1x1 conv on the pooled features) and an FFN (MatMul -> GELU ->
MatMul). Layers pair greedily in topological order; a layer in no block learns layer-wise. Per
block:

    minimise  E || B(x; W1, W2) - B~(x~; W1~, W2~) ||^2
              + lambda sum_{l = 1, 2} sum_i (1 - |2 h(V_l,i) - 1|^beta)

B is the FP32 model's nodes from L1's input to L2's output (before L2's activation, as
AdaRound's target), B~ the same nodes of the QDQ model, whose activation QuantizeLinear /
DequantizeLinear pairs run as onnxruntime computes them, q = saturate(round_half_even(x / s)
+ z), x^ = (q - z) s, with a straight-through gradient for the rounding (zero outside
[qmin, qmax]); x is the block's FP32 input, x~ its input in the QDQ model with every earlier
learned code in place (the layer-wise sweep's cache); W~_l AdaRound's soft weights on
onnxruntime's scales and zero points, the biases the QDQ model's int32 ones dequantized. The
error is the squared error summed over channels, mean over positions (no Fisher weighting:
BRECQ's Fisher proxy needs the gradient of the task loss, which unlabelled calibration data
does not give). h, V's initialisation, lambda, warm-up, the beta schedule and Adam on V are
AdaRound's (:class:`~onnxrep.training.adaround.AdaRoundConfig`).

The activation between the layers makes the error non-quadratic in the weights, so there is
no second-moment form: a block learns on mini-batches of ``batch`` cached samples, each
cropped to ``block_positions / batch`` input positions (seeded windows, the same window on x
and x~; both paths zero-pad at the crop borders, so the comparison stays like for like). One
step costs about three times the block's multiply-adds on a mini-batch, m; a block learns for
min(iterations, max(min_iterations, block_budget / (3 m))) iterations.

Guards: both layers also learn layer-wise first (AdaRound, the second on its input as the
first's layer-wise codes leave it, computed by the same torch nodes), and the block's learned
codes are kept only when its output error is lower than with nearest rounding and than with
the layer-wise codes, on the training samples and on the held-out ones (one seeded crop per
sample); otherwise the layer-wise codes are written (each only where it beat nearest on its
own layer). So a block never ends worse on its output than layer-wise learned rounding would
leave it. The model guard is learned rounding's (held-out output SQNR against nearest
rounding's). Export is AdaRound's: the codes go into the int8
weight initializers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import onnx
import torch

from onnxrep.ir.graph import GraphIndex
from onnxrep.ir.model import opset_version
from onnxrep.training import adaround
from onnxrep.training.adaround import (AdaRoundConfig, LayerRounding, Rounding, _adam, _beta,
                                       _dequant_value, _iterations, _Layer, _learn_layer, _reg,
                                       _Rounder, _write)
from onnxrep.training.convert import _OPS, ConvTranspose, Linear

# ops that may sit between the two layers of a block (each runs on its inputs elementwise or
# per position, so a crop of the block input is a crop of every tensor inside)
BETWEEN_OPS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu",
               "Mul", "Add", "Sub", "Div", "Erf", "Pow", "Sqrt", "Identity")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MAX_BETWEEN = 16


@dataclass
class Block:
    """Layers ``first`` -> ``second`` (positions in the layer list) and the nodes of each model
    from the first's input to the second's output."""

    first: int
    second: int
    qdq: "_Path"
    float: "_Path"


@dataclass(frozen=True)
class BlockResult:
    """The learned codes of both layers (torch layout), the block output MSE per output element
    (nearest, the layer-wise codes, learned) on the training and on the held-out samples, and
    the iterations. ``kept``: lower than both others on both sample sets."""

    codes: tuple[torch.Tensor, torch.Tensor]
    fit: tuple[float, float, float]
    held: tuple[float, float, float]
    iterations: int

    @property
    def kept(self) -> bool:
        return all(x[2] < min(x[:2]) for x in (self.fit, self.held))


def learn_rounding(float_model: onnx.ModelProto, qdq: onnx.ModelProto, batches: list[dict],
                   config: AdaRoundConfig | None = None) -> tuple[onnx.ModelProto, Rounding]:
    """:func:`onnxrep.training.adaround.learn_rounding` with the blocks of :func:`find_blocks`
    learned together (record mode "block")."""
    def plan(float_model, qdq, layers):
        return {j: (b.second, partial(_learn, b, layers))
                for j, b in find_blocks(float_model, qdq, layers).items()}
    return adaround.learn_rounding(float_model, qdq, batches, config, plan)


def find_blocks(float_model: onnx.ModelProto, qdq: onnx.ModelProto, layers: list[_Layer]
                ) -> dict[int, Block]:
    """{position of L1 in ``layers``: its block}; a layer belongs to at most one block."""
    qindex, findex = GraphIndex(qdq.graph), GraphIndex(float_model.graph)
    at_q = {lay.qdq_index: j for j, lay in enumerate(layers)}
    at_f = {lay.float_index: j for j, lay in enumerate(layers)}
    qopset, fopset = opset_version(qdq), opset_version(float_model)
    blocks: dict[int, Block] = {}
    used: set[int] = set()
    for j, lay in enumerate(layers):
        if j in used:
            continue
        q = _between(qdq.graph, qindex, lay.qdq_index, at_q, BETWEEN_OPS + QDQ_OPS)
        f = _between(float_model.graph, findex, lay.float_index, at_f, BETWEEN_OPS)
        if q is None or f is None or q[0] != f[0] or q[0] in used:
            continue
        k = q[0]
        two = (lay, layers[k])
        blocks[j] = Block(j, k,
                          _Path(qdq.graph, qindex, [lay.qdq_index, *q[1], two[1].qdq_index],
                                {x.qdq_index: x for x in two}, qopset),
                          _Path(float_model.graph, findex,
                                [lay.float_index, *f[1], two[1].float_index],
                                {x.float_index: x for x in two}, fopset))
        used.update((j, k))
    return blocks


def _between(graph: onnx.GraphProto, index: GraphIndex, start: int, layer_at: dict[int, int],
             ops: tuple[str, ...]) -> tuple[int, list[int]] | None:
    """(position of the one layer the output of node ``start`` reaches, the nodes in between)
    when they form a closed chain as the module docstring describes; else None."""
    outputs = {o.name for o in graph.output}
    tensors, between, seconds = set(), [], set()
    pending = [graph.node[start].output[0]]
    while pending:
        t = pending.pop()
        tensors.add(t)
        if t in outputs:
            return None
        for r in index.readers(t):
            node = graph.node[r]
            if r in layer_at and node.input[0] == t and t not in node.input[1:]:
                seconds.add(layer_at[r])
            elif node.op_type not in ops or len(between) >= MAX_BETWEEN:
                return None
            elif r not in between:
                between.append(r)
                pending.extend(o for o in node.output if o)
    if len(seconds) != 1:
        return None
    for i in between:
        node = graph.node[i]
        if len(node.output) != 1 or any(x and x not in tensors and _constant(index, graph, x)
                                        is None for x in node.input):
            return None
        if node.op_type == "QuantizeLinear" and index.const(node.input[1]).size != 1:
            return None  # per-channel activation quantization: not produced by onnxruntime
    return seconds.pop(), sorted(between)


def _constant(index: GraphIndex, graph: onnx.GraphProto, tensor: str) -> np.ndarray | None:
    return _dequant_value(index, graph, tensor) if index.const(tensor) is None \
        else index.const(tensor)


# ---- one model's nodes of a block as torch ------------------------------------------------------

def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round half to even; identity gradient. x + (round(x) - x) == round(x) exactly in float32
    (the difference is exact and the sum is representable)."""
    return x + (torch.round(x) - x).detach()


class _Path:
    """``run(x, weights)``: the nodes ``nodes`` of ``graph`` on the block input ``x``, each
    layer node through its torch module with ``weights[node index] = (weight in torch layout,
    bias)``; returns the last node's output and the multiply-adds of its layers."""

    def __init__(self, graph: onnx.GraphProto, index: GraphIndex, nodes: list[int],
                 layers: dict[int, _Layer], opset: int):
        self.input, self.output = graph.node[nodes[0]].input[0], graph.node[nodes[-1]].output[0]
        self.second_input = graph.node[nodes[-1]].input[0]
        self.layers = layers
        self.steps = []
        for i in sorted(nodes):
            node = graph.node[i]
            if i in layers:
                self.steps.append((i, None, [node.input[0]], node.output[0]))
                continue
            ins = [x if _constant(index, graph, x) is None
                   else torch.from_numpy(np.array(_constant(index, graph, x)))
                   for x in node.input if x]
            if node.op_type == "QuantizeLinear":
                zero = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] \
                    else np.zeros((), np.uint8)
                info = np.iinfo(zero.dtype)
                fn = _quantize(float(np.asarray(ins[1]).reshape(())),
                               float(zero.reshape(())), info.min, info.max)
                ins = ins[:1]
            elif node.op_type == "DequantizeLinear":
                zero = (float(index.const(node.input[2]).reshape(()))
                        if len(node.input) > 2 and node.input[2] else 0.0)
                scale = float(index.const(node.input[1]).reshape(()))
                fn = (lambda c, s=scale, z=zero: (c - z) * s)
                ins = ins[:1]
            else:
                fn = _OPS[node.op_type](node, opset)
            self.steps.append((i, fn, ins, node.output[0]))

    def run(self, x: torch.Tensor, weights: dict[int, tuple], until: str | None = None
            ) -> tuple[torch.Tensor, int]:
        """(tensor ``until`` (None: the output), multiply-adds); the layers ``until`` needs."""
        env = {self.input: x}
        macs = 0
        for i, fn, ins, out in self.steps:
            if until in env:
                return env[until], macs
            args = [env[a] if isinstance(a, str) else a for a in ins]
            if fn is None:
                w, b = weights[i]
                y = self.layers[i].module.apply(args[0], w, b)
                per = args[0] if isinstance(self.layers[i].module, ConvTranspose) else y
                macs += per.numel() * w[0].numel()
            else:
                y = fn(*args)
            env[out] = y
        return env[self.output], macs


def _quantize(scale: float, zero: float, lo: int, hi: int):
    """onnxruntime's QuantizeLinear as float codes (the DequantizeLinear after it reads them)."""
    s = torch.tensor(scale, dtype=torch.float32)

    def run(x):
        return torch.clamp(_round_ste(x / s) + zero, lo, hi)
    return run


# ---- learning one block -------------------------------------------------------------------------

def _learn(block: Block, layers: list[_Layer], xq, xf, n_train: int, cfg: AdaRoundConfig,
           gen: torch.Generator, index: GraphIndex) -> list[LayerRounding]:
    """Learn a block's two layers layer-wise (the second on its input as the first's codes
    leave it, computed in torch) and together (BRECQ); write the block's codes when they beat
    the layer-wise ones on the block output, else the layer-wise ones. Both layers' rows."""
    two = (layers[block.first], layers[block.second])
    row1, codes1 = _learn_layer(two[0], xq, xf, n_train, cfg, gen, None)
    x2q, x2f = second_inputs(block, two[0], codes1, xq, xf)
    row2, codes2 = _learn_layer(two[1], x2q, x2f, n_train, cfg, gen, None)
    del x2q, x2f
    began = time.monotonic()
    result = learn_block(block, layers, xq[:n_train], xf[:n_train], xq[n_train:], xf[n_train:],
                         cfg, gen, (codes1, codes2))
    if not result.kept:
        for lay, row, codes in ((two[0], row1, codes1), (two[1], row2, codes2)):
            if row.kept:
                _write(lay, codes, index)
        return [replace(row1, block=two[1].node), replace(row2, block=two[0].node)]
    seconds = time.monotonic() - began + row1.seconds + row2.seconds
    return [LayerRounding(lay.node, lay.op_type, int(lay.codes.size), result.fit[0],
                          result.fit[2], result.held[0], result.held[2],
                          _write(lay, codes, index), True, "block", result.iterations,
                          seconds / 2, other.node)
            for lay, codes, other in zip(two, result.codes, two[::-1])]


def _spatial(layer: _Layer, ndim: int) -> list[int]:
    """The position axes of the first layer's input (cropped; channels and batch are not)."""
    return list(range(1, ndim - 1)) if isinstance(layer.module, Linear) else list(range(2, ndim))


def _crop_shape(sizes: list[int], area: int) -> list[int]:
    """``sizes`` scaled down alike until their product is at most ``area``."""
    total = math.prod(sizes)
    if total <= area:
        return list(sizes)
    f = (area / total) ** (1 / len(sizes))
    return [max(1, min(s, int(s * f))) for s in sizes]


def _window(shape: tuple, axes: list[int], crop: list[int], gen: torch.Generator) -> tuple:
    """A seeded crop window of one sample (``shape`` without the batch axis)."""
    index = [slice(None)] * len(shape)
    for a, c in zip(axes, crop):
        top = int(torch.randint(shape[a - 1] - c + 1, (1,), generator=gen))
        index[a - 1] = slice(top, top + c)
    return tuple(index)


def second_inputs(block: Block, first: _Layer, codes: torch.Tensor, xq: list[np.ndarray],
                  xf: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The second layer's input per batch in the QDQ model with the first layer's ``codes``
    (torch layout) and in the FP32 model, from the block inputs ``xq`` / ``xf``."""
    r = _Rounder(first)
    qw = {first.qdq_index: (r.dequant(codes), torch.from_numpy(first.qbias))}
    fw = {first.float_index: (r.w, torch.from_numpy(first.bias))}
    with torch.no_grad():
        return ([block.qdq.run(torch.from_numpy(a), qw, block.qdq.second_input)[0].numpy()
                 for a in xq],
                [block.float.run(torch.from_numpy(a), fw, block.float.second_input)[0].numpy()
                 for a in xf])


def learn_block(block: Block, layers: list[_Layer], xq: list[np.ndarray], xf: list[np.ndarray],
                hq: list[np.ndarray], hf: list[np.ndarray], cfg: AdaRoundConfig,
                gen: torch.Generator, layerwise: tuple[torch.Tensor, torch.Tensor]
                ) -> BlockResult:
    """Learn both layers' codes on (xq, xf) (the block input in the QDQ and FP32 models, per
    batch) and measure them, nearest's and the ``layerwise`` codes on (xq, xf) and (hq, hf)."""
    two = (layers[block.first], layers[block.second])
    rounders = [_Rounder(lay) for lay in two]
    qpos = [lay.qdq_index for lay in two]
    fweights = {lay.float_index: (r.w, torch.from_numpy(lay.bias))
                for lay, r in zip(two, rounders)}
    qbias = [torch.from_numpy(lay.qbias) for lay in two]
    rows = [(a, i) for a in range(len(xq)) for i in range(len(xq[a]))]
    held = [(a, i) for a in range(len(hq)) for i in range(len(hq[a]))]
    axes = _spatial(two[0], xq[0].ndim)
    sizes = [min(x.shape[a] for x in xq + hq) for a in axes]
    crop = _crop_shape(sizes, max(1, cfg.block_positions // cfg.batch))
    channel = -1 if isinstance(two[1].module, Linear) else 1

    def sample(qs, fs, picks, windows):
        xs = torch.from_numpy(np.stack([qs[a][i][w] for (a, i), w in zip(picks, windows)]))
        ys = torch.from_numpy(np.stack([fs[a][i][w] for (a, i), w in zip(picks, windows)]))
        return xs, ys

    def outputs(xs, ys, weights):
        """(the FP32 block's output, the QDQ block's with ``weights``, the multiply-adds)."""
        with torch.no_grad():
            t, _ = block.float.run(ys, fweights)
        y, macs = block.qdq.run(xs, {i: (w, b) for i, w, b in zip(qpos, weights, qbias)})
        return t, y, macs

    def error(y, t):  # squared error summed over channels, mean over positions and samples
        return (y - t).pow(2).sum(channel).mean()

    def measure(codes, qs, fs, picks, windows):
        weights = [r.dequant(c) for r, c in zip(rounders, codes)]
        total = 0.0
        with torch.no_grad():
            for s in range(0, len(picks), cfg.batch):
                t, y, _ = outputs(*sample(qs, fs, picks[s:s + cfg.batch],
                                          windows[s:s + cfg.batch]), weights)
                total += float(error(y, t)) * len(t)
        return total / max(len(picks), 1) / two[1].qbias.size

    def windows_of(qs, picks):
        return [_window(qs[a][i].shape, axes, crop, gen) for a, i in picks]

    fit_windows, held_windows = windows_of(xq, rows), windows_of(hq, held)
    nearest = [r.nearest for r in rounders]
    near = [(measure(c, xq, xf, rows, fit_windows), measure(c, hq, hf, held, held_windows))
            for c in (nearest, list(layerwise))]
    opt = _adam([r.v for r in rounders], cfg.lr)
    iterations, it = None, 0
    while iterations is None or it < iterations:
        picks = [rows[int(i)] for i in torch.randperm(len(rows), generator=gen)[:cfg.batch]]
        opt.zero_grad()
        t, y, macs = outputs(*sample(xq, xf, picks, windows_of(xq, picks)),
                             [r.soft() for r in rounders])
        if iterations is None:
            iterations = _iterations(cfg, 3 * macs, cfg.block_budget)
        loss = error(y, t)
        beta = _beta(cfg, it, iterations)
        if beta is not None:
            loss = loss + cfg.reg * sum(_reg(r, beta) for r in rounders)
        loss.backward()
        opt.step()
        it += 1
    codes = [r.hard_codes() for r in rounders]
    return BlockResult((codes[0], codes[1]),
                       (near[0][0], near[1][0], measure(codes, xq, xf, rows, fit_windows)),
                       (near[0][1], near[1][1], measure(codes, hq, hf, held, held_windows)),
                       iterations)
