"""Learned rounding of quantized weights (AdaRound, Nagel et al. 2020, arXiv 2004.10568).

Works on the QDQ model onnxruntime wrote: every Conv / ConvTranspose / Gemm / MatMul whose weight
is ``DequantizeLinear(int8 initializer, scale, zero point)`` keeps onnxruntime's scale and zero
point (per-tensor or per-channel, as quantized) and learns, per weight, whether to round down or
up. Layers go in topological order; each learns on cached inputs:

    minimise  E_positions || (W x + b) - (W~ x~ + b~) ||^2  +  lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

with x the layer's FP32 input (the FP32 model), x~ its input in the QDQ model with every earlier
layer's learned codes in place, b~ the (bias-corrected) int32 bias as dequantized, and
W~ = s (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z), h(V) = clamp(sigmoid(V) (zeta - gamma)
+ gamma, 0, 1) (zeta 1.1, gamma -0.1), V initialised so h(V) = W / s - floor(W / s); no
regulariser for the first ``warmup`` share of the iterations, then beta annealed linearly from 20
to 2 (the paper's schedule, as BRECQ's code runs it); Adam on V. The codes are
floor(W / s) + [V >= 0], clamped to the codes onnxruntime used.

The reconstruction error is quadratic in the weights, so for Conv (1-D/2-D, via unfold), Gemm,
MatMul and a ConvTranspose whose kernel equals its stride (each input position writes its own
output block: a linear layer per position) it is computed from second moments gathered once per
layer (``A = E[x~ x~^T]`` with a ones row for the bias, ``M = E[x~ (W (x~ - x))^T]``,
``c = E||W (x~ - x)||^2``): an iteration costs one (K+1) x (K+1) product per output channel
whatever the number of samples, and every iteration sees every sampled position. Positions are
sampled (seeded) up to ``max_positions`` per layer; a layer whose iterations would cost more
than ``layer_budget`` multiply-adds learns for fewer (at least ``min_iterations``). Other
ConvTransposes (and Conv with other ranks) learn on mini-batches of the cached samples through
the layer's torch op instead.

Export: the learned codes are written into the QDQ model's int8 weight initializers, so its
dequantized weights equal the learned fake-quant weights; scales, zero points and int32 biases
(bias scale = input scale x weight scale) are unchanged. Per layer the learned codes are kept
only when their reconstruction error is lower than nearest rounding's on the same data; for the
model, the learned QDQ model is kept only when its output SQNR against FP32 on a held-out share
of the calibration samples is higher than the nearest-rounding model's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from onnxrep import verify
from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.ir.layers import out_channels
from onnxrep.passes.base import Skip
from onnxrep.progress import Progress, log
from onnxrep.ptq.bias_correction import _ancestors, _read_graph
from onnxrep.report import table
from onnxrep.training.convert import Conv, ConvTranspose, Linear, _weight_module

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ZETA, GAMMA = 1.1, -0.1
LAYER_BUDGET = 1e11
BLOCK_BUDGET = 5e10


@dataclass(frozen=True)
class AdaRoundConfig:
    """``iterations`` per layer; ``reg``: lambda; ``beta``: (start, end) of the annealed
    exponent; ``warmup``: share of iterations without the regulariser; ``lr``: Adam on V;
    ``max_positions``: positions (output pixels x samples) sampled per layer for the second
    moments; ``layer_budget``: multiply-adds per layer for the iterations of the moment form (a
    layer whose iteration costs c = Cout (K+1)^2 learns for min(iterations, max(min_iterations,
    layer_budget / c)) iterations; None: no bound); ``batch``: samples per step for layers
    learned on mini-batches; ``held_out``: share of the calibration samples kept aside to choose
    between nearest and learned; ``seed``. For block reconstruction
    (:mod:`onnxrep.training.brecq`): ``block_budget``: multiply-adds per block (a step costs
    3 x the block's on a mini-batch; None: no bound); ``block_positions``: input positions per
    block mini-batch (the samples are cropped to ``block_positions / batch`` each)."""

    iterations: int = 1000
    layer_budget: float | None = LAYER_BUDGET
    min_iterations: int = 250
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 1e-2
    max_positions: int = 32768
    batch: int = 4
    held_out: float = 0.25
    seed: int = 0
    threads: int = 1
    block_budget: float | None = BLOCK_BUDGET
    block_positions: int = 2048


@dataclass(frozen=True)
class LayerRounding:
    """One layer: reconstruction MSE (per output element, with the inputs as the earlier
    learned layers leave them) with nearest and with learned codes, on the training samples
    and on the held-out ones; ``changed``: codes that differ from nearest; ``kept``: the learned
    codes were written (they lowered both errors); ``iterations`` it learned for."""

    node: str
    op_type: str
    weights: int
    loss_nearest: float
    loss_learned: float
    held_nearest: float
    held_learned: float
    changed: int
    kept: bool
    method: str  # "moments" | "minibatch" | "block" (with the layer named in ``block``)
    iterations: int = 0
    seconds: float = 0.0  # gathering its data and learning (not the runs that feed it)
    block: str = ""  # the other layer of the block it learned in (method "block": the block's
    #                  codes beat the layer-wise ones; its losses are the block output's MSE)


@dataclass
class Rounding:
    """What learned rounding did. ``sqnr_nearest``/``sqnr_learned``: output SQNR (dB) against
    FP32 on the ``held_out`` samples; ``kept``: the learned model was returned."""

    mode: str
    layers: list[LayerRounding] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    samples: int = 0
    held_out: int = 0
    sqnr_nearest: float | None = None
    sqnr_learned: float | None = None
    kept: bool = False
    seconds: float = 0.0
    config: AdaRoundConfig = field(default_factory=AdaRoundConfig)

    @property
    def loss_nearest(self) -> float:
        return float(np.mean([r.loss_nearest for r in self.layers])) if self.layers else 0.0

    @property
    def loss_learned(self) -> float:
        """Mean layer MSE on the training samples with the codes written."""
        return float(np.mean([r.loss_learned if r.kept else r.loss_nearest
                              for r in self.layers])) if self.layers else 0.0

    def summary(self) -> str:
        if not self.layers:
            return "learned rounding: no layer to learn"
        verdict = ("kept" if self.kept else
                   "discarded: nearest rounding scored higher on the held-out samples")
        learned = sum(r.kept for r in self.layers)
        blocks = sum(r.method == "block" for r in self.layers) // 2
        return (f"learned rounding on {len(self.layers)} layers ({learned} kept, "
                + (f"{blocks} two-layer blocks kept, " if self.mode == "block" else "")
                + f"{self.samples} samples, {_span(r.iterations for r in self.layers)} "
                f"iterations) in "
                f"{self.seconds:.1f} s: mean layer MSE {self.loss_nearest:.4g} -> "
                f"{self.loss_learned:.4g}, held-out output SQNR ({self.held_out} samples) "
                f"{self.sqnr_nearest:.2f} -> {self.sqnr_learned:.2f} dB; {verdict}")

    def table(self) -> str:
        rows = [[r.node, r.op_type, r.weights, r.iterations, f"{r.loss_nearest:.4g}",
                 f"{r.loss_learned:.4g}", f"{r.held_nearest:.4g}", f"{r.held_learned:.4g}",
                 r.changed, "yes" if r.kept else "no", f"{r.seconds:.1f}"] for r in self.layers]
        return table(["node", "op", "weights", "iterations", "MSE nearest", "MSE learned",
                      "held-out nearest", "held-out learned", "changed", "kept", "s"], rows,
                     "llrrrrrrrlr")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "kept": self.kept, "samples": self.samples,
                "held_out": self.held_out, "sqnr_nearest": self.sqnr_nearest,
                "sqnr_learned": self.sqnr_learned, "seconds": self.seconds,
                "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
                "layers": [vars(r) for r in self.layers], "skipped": [vars(s) for s in self.skips]}


def _span(values) -> str:
    values = sorted(set(values))
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


# ---- the layers --------------------------------------------------------------------------------

@dataclass
class _Layer:
    node: str
    op_type: str
    module: object  # onnxrep.training.convert.WeightLayer (torch op and layout)
    codes_name: str  # int8/uint8 initializer in the QDQ model
    w_onnx: np.ndarray  # FP32 weight, ONNX layout
    codes: np.ndarray  # nearest codes (ONNX layout, integer dtype)
    scale: np.ndarray  # broadcast to the weight's ONNX shape (float32)
    zero: np.ndarray  # same
    bias: np.ndarray  # FP32 bias (zeros when none), [Cout]
    qbias: np.ndarray  # dequantized bias of the QDQ model (or its float bias), [Cout]
    qdq_index: int = -1
    float_index: int = -1


def _broadcast(v: np.ndarray, shape: tuple, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return np.broadcast_to(v.reshape(()), shape)
    view = [1] * len(shape)
    view[axis if axis is not None else 1] = -1
    return np.broadcast_to(v.reshape(view), shape)


def _dequant_value(index: GraphIndex, graph: onnx.GraphProto, tensor: str) -> np.ndarray | None:
    """The float value of ``tensor`` when it is a constant or DQ(constant)."""
    value = index.const(tensor)
    if value is not None:
        return value.astype(np.float32)
    i = index.producer.get(tensor)
    node = graph.node[i] if i is not None else None
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q, s = index.const(node.input[0]), index.const(node.input[1])
    z = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q is None or s is None:
        return None
    axis = int(attr(node, "axis", 1))
    zz = _broadcast(z if z is not None else np.zeros((), q.dtype), q.shape, axis)
    return ((q.astype(np.int64) - zz.astype(np.int64)).astype(np.float32)
            * _broadcast(s, q.shape, axis).astype(np.float32))


def _find_layers(float_model: onnx.ModelProto, qdq: onnx.ModelProto, skips: list[Skip]
                 ) -> list[_Layer]:
    findex, qindex = GraphIndex(float_model.graph), GraphIndex(qdq.graph)
    fnodes = {n.name: i for i, n in enumerate(float_model.graph.node)}
    layers = []
    for qi, node in enumerate(qdq.graph.node):
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        fi = fnodes.get(node.name)
        dq = qindex.producer.get(node.input[1])
        dq = qdq.graph.node[dq] if dq is not None else None
        if fi is None or dq is None or dq.op_type != "DequantizeLinear":
            if fi is not None and node.op_type in LAYER_OPS:
                skips.append(Skip(node.name, "weight not quantized (excluded or not a constant)"))
            continue
        fnode = float_model.graph.node[fi]
        codes = qindex.const(dq.input[0])
        scale = qindex.const(dq.input[1])
        if codes is None or scale is None or not np.issubdtype(codes.dtype, np.integer):
            skips.append(Skip(node.name, "weight DequantizeLinear does not read constants"))
            continue
        if len(qindex.readers(dq.input[0])) != 1 or len(qindex.readers(dq.output[0])) != 1:
            skips.append(Skip(node.name, "quantized weight shared with another node"))
            continue
        module = _weight_module(fnode, fi, node.name, findex)
        if module is None or not hasattr(module, "apply"):
            skips.append(Skip(node.name, "layer form not supported (shared or non-constant "
                                         "parameters, Gemm with alpha/transA, N-D MatMul)"))
            continue
        w = findex.const(fnode.input[1]).astype(np.float32)
        if w.shape != codes.shape:
            skips.append(Skip(node.name, "quantized weight shape differs from the float one"))
            continue
        if node.op_type == "Gemm" and float(attr(node, "beta", 1.0)) != 1.0:
            skips.append(Skip(node.name, "Gemm with beta != 1"))
            continue
        axis = attr(dq, "axis", None)
        axis = None if scale.size == 1 else int(axis if axis is not None else 1)
        z = qindex.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        zero = _broadcast(z if z is not None else np.zeros((), codes.dtype), w.shape, axis)
        cout = out_channels(node, w.shape)
        b = findex.const(fnode.input[2]) if len(fnode.input) > 2 and fnode.input[2] else None
        b = np.zeros(cout, np.float32) if b is None else b.astype(np.float32).reshape(-1)
        qb = (_dequant_value(qindex, qdq.graph, node.input[2])
              if len(node.input) > 2 and node.input[2] else np.zeros(cout, np.float32))
        if qb is None or b.size != cout or qb.size != cout:
            skips.append(Skip(node.name, "bias is not a per-channel constant"))
            continue
        layers.append(_Layer(node.name, node.op_type, module, dq.input[0], w, codes,
                             _broadcast(scale, w.shape, axis).astype(np.float32),
                             np.asarray(zero), b, qb.reshape(-1).astype(np.float32), qi, fi))
    return layers


def _torch_layout(layer: _Layer, a: np.ndarray | torch.Tensor):
    """ONNX layout -> the torch module's layout (Gemm transB=0 / MatMul weights transposed)."""
    if isinstance(layer.module, Linear) and layer.module.onnx_transposed:
        return a.T
    return a


# ---- layer-by-layer runs -----------------------------------------------------------------------

class _Stepper:
    """``model`` run on ``batches`` layer by layer: ``inputs(k)`` computes (once) everything
    layer k reads and returns its first input per batch; ``layer(k)`` then runs the layer node and
    the DequantizeLinear nodes feeding it from constants, with the model's initializers as they
    are at that moment (so learned codes written in between take effect); ``outputs()`` runs the
    rest and returns the graph outputs per batch. Cached tensors are dropped after their last
    reader ran (the bias-correction sweep's scheme, with the layer split off its inputs)."""

    def __init__(self, model: onnx.ModelProto, layers: list[int], batches: list[dict]):
        self.model, self.batches = model, batches
        producer, deps, pos = _read_graph(self, model)
        done: set[int] = set()
        self.steps: list[list[int]] = []  # pre_0, own_0, pre_1, own_1, ..., final
        for t in layers:
            own = [t] + [producer[x] for x in self.reads[t][1:] if x in producer
                         and self.nodes[producer[x]].op_type == "DequantizeLinear"
                         and all(y in self.inits for y in self.reads[producer[x]])
                         and producer[x] not in done]
            done.update(own)
            roots = [producer[x] for i in own for x in self.reads[i]
                     if x in producer and producer[x] not in done]
            self.steps.append(_ancestors(roots, deps, done, pos))
            self.steps.append(sorted(own, key=pos.__getitem__))
        roots = [producer[o] for o in self.outputs if o in producer]
        self.steps.append(_ancestors(roots, deps, done, pos))
        self.last_use: dict[str, int] = {}
        for k, step in enumerate(self.steps):
            for i in step:
                for x in self.reads[i]:
                    self.last_use[x] = k
        for o in self.outputs:
            self.last_use[o] = len(self.steps)
        self.layers = layers
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in batches]

    def value(self, b: int, name: str) -> np.ndarray:
        return self.cache[b][name] if name in self.cache[b] else self.batches[b][name]

    def _run(self, k: int, keep: tuple[str, ...] = ()) -> None:
        seg = self.steps[k]
        if not seg:
            return
        produced = {o for i in seg for o in self.nodes[i].output if o}
        inputs, inits = [], []
        for i in seg:
            for x in self.reads[i]:
                if x in produced or x in inputs or x in inits:
                    continue
                (inits if x in self.inits and x not in self.batches[0] else inputs).append(x)
        vis = []
        for x in inputs:
            if x in self.graph_inputs and x not in self.cache[0]:
                vis.append(self.graph_inputs[x])
            else:
                v = self.value(0, x)
                vis.append(helper.make_tensor_value_info(
                    x, helper.np_dtype_to_tensor_dtype(v.dtype), None))
        outputs = [o for i in seg for o in self.nodes[i].output
                   if o and (self.last_use.get(o, -1) > k or o in keep)]
        graph = helper.make_graph([self.nodes[i] for i in seg], f"step{k}", vis,
                                  [onnx.ValueInfoProto(name=o) for o in outputs],
                                  initializer=[self.inits[x] for x in inits])
        part = onnx.ModelProto()
        part.ir_version = self.model.ir_version
        part.opset_import.extend(self.model.opset_import)
        part.functions.extend(self.model.functions)
        part.graph.CopyFrom(graph)
        session = verify.session(part)
        for b, store in enumerate(self.cache):
            values = session.run(outputs, {x: self.value(b, x) for x in inputs})
            store.update(zip(outputs, values))

    def _drop(self, k: int) -> None:
        for store in self.cache:
            for name in [x for x in store if self.last_use.get(x, -1) <= k]:
                del store[name]

    def inputs(self, j: int) -> list[np.ndarray]:
        """Run the step before layer ``j`` (its position in ``layers``); its input per batch."""
        self._run(2 * j)
        self._drop(2 * j)
        x = self.nodes[self.layers[j]].input[0]
        return [self.value(b, x) for b in range(len(self.batches))]

    def layer(self, j: int) -> None:
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self._run(2 * j + 1)
        self._drop(2 * j + 1)

    def finish(self) -> list[list[np.ndarray]]:
        k = len(self.steps) - 1
        self._run(k)
        return [[self.value(b, o) for o in self.outputs] for b in range(len(self.batches))]


# ---- learning one layer ------------------------------------------------------------------------

def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _v_init(rest: torch.Tensor) -> torch.Tensor:
    r = torch.clamp(rest, 1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


class _Rounder:
    """Soft and hard codes of one weight (torch layout, float64 bookkeeping avoided: all
    float32, as onnxruntime dequantizes)."""

    def __init__(self, layer: _Layer):
        t = lambda a: torch.from_numpy(np.ascontiguousarray(_torch_layout(layer, a)))  # noqa
        self.w = t(layer.w_onnx.astype(np.float32))
        self.s = t(layer.scale.astype(np.float32))
        self.z = t(layer.zero.astype(np.float32))
        self.nearest = t(layer.codes.astype(np.float32))
        self.lo, self.hi = float(layer.codes.min()), float(layer.codes.max())
        self.floor = torch.floor(self.w / self.s)
        self.v = _v_init(self.w / self.s - self.floor).requires_grad_(True)
        self.iterations = 0

    def soft(self) -> torch.Tensor:
        q = torch.clamp(self.floor + _h(self.v) + self.z, self.lo, self.hi)
        return (q - self.z) * self.s

    def hard_codes(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.clamp(self.floor + (self.v >= 0).float() + self.z, self.lo, self.hi)

    def dequant(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.z) * self.s


def _adam(vs: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(vs, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(vs, lr=lr)


def _iterations(cfg: AdaRoundConfig, cost: int, budget: float | None) -> int:
    """Iterations of a layer (or block) whose iteration costs ``cost`` multiply-adds:
    ``cfg.iterations``, fewer (down to ``cfg.min_iterations``) when they would cost more than
    ``budget`` (None: no bound)."""
    if budget is None:
        return cfg.iterations
    return int(min(cfg.iterations, max(cfg.min_iterations, budget // max(cost, 1))))


def _beta(cfg: AdaRoundConfig, it: int, iterations: int) -> float | None:
    """The regulariser's exponent at iteration ``it`` of ``iterations``; None during warm-up."""
    start = int(cfg.warmup * iterations)
    if it < start:
        return None
    rel = (it - start) / max(iterations - start, 1)
    b0, b1 = cfg.beta
    return b1 + (b0 - b1) * max(0.0, 1 - rel)


def _reg(rounder: _Rounder, beta: float) -> torch.Tensor:
    return (1 - (2 * _h(rounder.v) - 1).abs().pow(beta)).sum()


class _Moments:
    """Second moments of one layer as a batched linear map y = W_g x_g per group g."""

    def __init__(self, groups: int, k: int, cout_g: int):
        self.g, self.k, self.cout_g = groups, k, cout_g
        self.A = torch.zeros(groups, k + 1, k + 1, dtype=torch.float64)
        self.M = torch.zeros(groups, k + 1, cout_g, dtype=torch.float64)
        self.c = 0.0
        self.n = 0

    def add(self, xq: torch.Tensor, xf: torch.Tensor, wg: torch.Tensor) -> None:
        """xq, xf: [G, K, P] columns of the QDQ and FP32 inputs; wg: [G, Cout_g, K]."""
        ones = torch.ones(self.g, 1, xq.shape[2])
        xa = torch.cat([xq, ones], 1)
        e0 = torch.bmm(wg, xq - xf)  # W (x~ - x): [G, Cout_g, P]
        self.A += torch.bmm(xa, xa.transpose(1, 2)).double()
        self.M += torch.bmm(xa, e0.transpose(1, 2)).double()
        self.c += float(e0.double().pow(2).sum())
        self.n += xq.shape[2]

    def finish(self) -> None:
        self.A = (self.A / self.n).float()
        self.M = (self.M / self.n).float()
        self.c /= self.n

    def loss(self, dw: torch.Tensor, db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E||e||^2 summed over channels, its gradient w.r.t. dw); dw [G, Cout_g, K]."""
        da = torch.cat([dw, db.reshape(self.g, self.cout_g, 1)], 2)
        dA = torch.bmm(da, self.A)
        mt = self.M.transpose(1, 2)
        value = (da * dA).sum() + 2 * (da * mt).sum() + self.c
        return value, 2 * (dA + mt)[:, :, :self.k]

    def grad(self, dw: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """The gradient of :meth:`loss` w.r.t. ``dw`` alone: 2 (D A + M^T), weight columns."""
        da = torch.cat([dw, db.reshape(self.g, self.cout_g, 1)], 2)
        return 2 * torch.baddbmm(self.M.transpose(1, 2), da, self.A)[:, :, :self.k]


def _columns(layer: _Layer, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as [G, K, P] columns (None for ops without the moment form)."""
    m = layer.module
    if isinstance(m, Linear):
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    if _patchwise(layer):
        return x.transpose(0, 1).reshape(x.shape[1], -1).unsqueeze(0)
    if not isinstance(m, Conv) or x.ndim not in (3, 4):
        return None
    x, padding = m.pads(x)
    kernel, strides, dil = m.kernel, m.strides, m.dilations
    if x.ndim == 3:
        x = x.unsqueeze(2)
        kernel, strides, dil = (1, *kernel), (1, *strides), (1, *dil)
        padding = (0, *padding) if isinstance(padding, tuple) else 0
    cols = F.unfold(x, kernel, dilation=dil, padding=padding, stride=strides)  # [N, C k, L]
    n, ck, length = cols.shape
    cols = cols.reshape(n, m.groups, ck // m.groups, length).permute(1, 2, 0, 3)
    return cols.reshape(m.groups, ck // m.groups, n * length)


def _patchwise(layer: _Layer) -> bool:
    """A ConvTranspose whose kernel equals its stride (no padding, dilation or groups): each
    input position alone writes a k1 x k2 output block, y[(o, a, b), p] = sum_i W[i, o, a, b]
    x[i, p], a linear layer with Cout k1 k2 outputs per input position."""
    m = layer.module
    return (isinstance(m, ConvTranspose) and m.groups == 1
            and tuple(m.strides) == layer.w_onnx.shape[2:] and not any(m.begin + m.end)
            and not any(m.output_padding) and all(d == 1 for d in m.dilations))


def _grouped(layer: _Layer, w: torch.Tensor) -> torch.Tensor:
    """Torch-layout weight -> [G, Cout_g, K] (a patchwise ConvTranspose: [1, Cout k1 k2, Cin])."""
    if _patchwise(layer):
        return w.reshape(w.shape[0], -1).T.unsqueeze(0)
    g = layer.module.groups if isinstance(layer.module, Conv) else 1
    return w.reshape(g, w.shape[0] // g, -1)


def _ungrouped(layer: _Layer, wg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_grouped`."""
    if _patchwise(layer):
        return wg[0].T.reshape(shape)
    return wg.reshape(shape)


def _bias_rows(layer: _Layer, b: torch.Tensor) -> torch.Tensor:
    """A per-output-channel bias as the rows of :func:`_grouped`."""
    if _patchwise(layer):
        return b.repeat_interleave(int(np.prod(layer.w_onnx.shape[2:])))
    return b


def _gather(layer: _Layer, wg: torch.Tensor, xq: list[np.ndarray], xf: list[np.ndarray],
            cfg: AdaRoundConfig, gen: torch.Generator) -> _Moments:
    g, cout_g, k = wg.shape
    mom = _Moments(g, k, cout_g)
    total = sum(len(a) for a in xq)
    per_sample = max(1, math.ceil(cfg.max_positions / max(total, 1)))
    with torch.no_grad():
        for a, b in zip(xq, xf):
            for i in range(0, len(a), 8):
                cq = _columns(layer, torch.from_numpy(np.ascontiguousarray(a[i:i + 8])))
                cf = _columns(layer, torch.from_numpy(np.ascontiguousarray(b[i:i + 8])))
                rows = min(8, len(a) - i)
                per = cq.shape[2] // rows
                if per > per_sample:
                    pick = torch.cat([j * per + torch.randperm(per, generator=gen)[:per_sample]
                                      for j in range(rows)])
                    cq, cf = cq[:, :, pick], cf[:, :, pick]
                mom.add(cq, cf, wg)
    mom.finish()
    return mom


def _learn_moments(layer: _Layer, xq: list[np.ndarray], xf: list[np.ndarray],
                   hq: list[np.ndarray], hf: list[np.ndarray], cfg: AdaRoundConfig,
                   gen: torch.Generator):
    """Learn on (xq, xf); returns (codes, [nearest, learned] MSE on the training samples,
    the same on the held-out samples (hq, hf), the rounder)."""
    r = _Rounder(layer)
    wg = _grouped(layer, r.w)
    g, cout_g, k = wg.shape
    mom = _gather(layer, wg, xq, xf, cfg, gen)
    held = _gather(layer, wg, hq, hf, cfg, gen)
    db = _bias_rows(layer, torch.from_numpy(layer.qbias - layer.bias))
    cout = g * cout_g

    def losses(codes, m=None):
        with torch.no_grad():
            d = _grouped(layer, r.dequant(codes) - r.w)
            return [float(x.loss(d, db)[0]) / cout for x in (mom, held)]

    near = losses(r.nearest)
    opt = _adam([r.v], cfg.lr)
    r.iterations = _iterations(cfg, g * cout_g * (k + 1) ** 2, cfg.layer_budget)
    with torch.no_grad():
        for it in range(r.iterations):
            # gradients by hand (one batched product per step; autograd tripled the cost)
            sig = torch.sigmoid(r.v)
            hs = sig * (ZETA - GAMMA) + GAMMA
            h = hs.clamp(0, 1)
            q = r.floor + h + r.z
            inside = (q >= r.lo) & (q <= r.hi)
            dw = _grouped(layer, (q.clamp(r.lo, r.hi) - r.z) * r.s - r.w)
            grad = _ungrouped(layer, mom.grad(dw, db), r.w.shape) * r.s * inside
            beta = _beta(cfg, it, r.iterations)
            if beta is not None:
                u = 2 * h - 1
                grad = grad - cfg.reg * 2 * beta * u.abs().pow(beta - 1) * u.sign()
            dh = (ZETA - GAMMA) * sig * (1 - sig) * ((hs > 0) & (hs < 1))
            # contiguous: fused Adam pairs parameter and gradient elements by storage order,
            # and a patchwise ConvTranspose's gradient comes back transposed
            r.v.grad = (grad * dh).contiguous()
            opt.step()
    codes = r.hard_codes()
    learned = losses(codes)
    return codes, [near[0], learned[0]], [near[1], learned[1]], r


def _learn_minibatch(layer: _Layer, xq: list[np.ndarray], xf: list[np.ndarray],
                     hq: list[np.ndarray], hf: list[np.ndarray], cfg: AdaRoundConfig,
                     gen: torch.Generator):
    r = _Rounder(layer)
    m = layer.module
    b = torch.from_numpy(layer.bias)
    qb = torch.from_numpy(layer.qbias)
    rows = [(i, j) for i, a in enumerate(xq) for j in range(len(a))]
    with torch.no_grad():
        targets = [m.apply(torch.from_numpy(np.ascontiguousarray(a)), r.w, b).numpy()
                   for a in xf]

    def pick(idx):
        xs = torch.from_numpy(np.stack([xq[i][j] for i, j in idx]))
        ys = torch.from_numpy(np.stack([targets[i][j] for i, j in idx]))
        return xs, ys

    def mse(y, t):  # mean over samples and positions of the squared error summed over channels
        return (y - t).pow(2).sum(1).mean()

    def loss_of(codes, xs, fs):
        with torch.no_grad():
            w, total, count = r.dequant(codes), 0.0, 0
            for a, f in zip(xs, fs):
                t = m.apply(torch.from_numpy(np.ascontiguousarray(f)), r.w, b)
                y = m.apply(torch.from_numpy(np.ascontiguousarray(a)), w, qb)
                total += float(mse(y, t)) * len(a)
                count += len(a)
            return total / max(count, 1) / qb.numel()

    near = [loss_of(r.nearest, xq, xf), loss_of(r.nearest, hq, hf)]
    opt = _adam([r.v], cfg.lr)
    r.iterations = cfg.iterations
    for it in range(r.iterations):
        idx = [rows[int(i)] for i in torch.randperm(len(rows), generator=gen)[:cfg.batch]]
        xs, ys = pick(idx)
        opt.zero_grad()
        loss = mse(m.apply(xs, r.soft(), qb), ys)
        beta = _beta(cfg, it, r.iterations)
        if beta is not None:
            loss = loss + cfg.reg * _reg(r, beta)
        loss.backward()
        opt.step()
    codes = r.hard_codes()
    return (codes, [near[0], loss_of(codes, xq, xf)], [near[1], loss_of(codes, hq, hf)], r)


def _moment_form(layer: _Layer, x: np.ndarray) -> bool:
    m = layer.module
    return (isinstance(m, Linear) or _patchwise(layer)
            or (isinstance(m, Conv) and x.ndim in (3, 4)))


# ---- the model ----------------------------------------------------------------------------------

def _split(batches: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    """(training, held-out) batches: the last ``share`` of the batches when there are 4 or more,
    else the last rows of each batch (at least one training row per batch)."""
    if len(batches) >= 4:
        n = max(1, round(len(batches) * share))
        return batches[:-n], batches[-n:]
    train, held = [], []
    for feeds in batches:
        rows = len(next(iter(feeds.values())))
        n = min(rows - 1, max(1, round(rows * share))) if rows > 1 else 0
        if n == 0:
            train.append(feeds)
            continue
        train.append({k: v[:rows - n] for k, v in feeds.items()})
        held.append({k: v[rows - n:] for k, v in feeds.items()})
    return train, held


def _sqnr(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    signal = sum(float(np.sum(np.square(np.asarray(r, np.float64))))
                 for ref in reference for r in ref)
    noise = sum(float(np.sum(np.square(np.asarray(r, np.float64) - o)))
                for ref, out in zip(reference, outputs) for r, o in zip(ref, out))
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def learn_rounding(float_model: onnx.ModelProto, qdq: onnx.ModelProto, batches: list[dict],
                   config: AdaRoundConfig | None = None, blocks=None
                   ) -> tuple[onnx.ModelProto, Rounding]:
    """``qdq`` (not mutated) with learned weight codes, or ``qdq`` itself when nearest rounding
    scores higher on the held-out samples; and the record.

    ``float_model``: the FP32 model ``qdq`` quantizes (same node names; its layer outputs are
    the targets); ``batches``: calibration feeds (a share is held out). ``blocks``: None (every
    layer on its own) or ``blocks(float_model, the QDQ copy, layers) -> {position of a block's
    first layer: (position of its last, learn)}``, ``learn(xq, xf, n_train, config, generator,
    index)`` learning the block on its cached inputs, writing its codes through ``index`` and
    returning both layers' rows (:func:`onnxrep.training.brecq.learn_rounding`)."""
    cfg = config or AdaRoundConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _learn_rounding(float_model, qdq, batches, cfg, blocks)
    finally:
        torch.set_num_threads(threads)


def _learn_rounding(float_model, qdq, batches, cfg: AdaRoundConfig, blocks):
    began = time.monotonic()
    record = Rounding("learned" if blocks is None else "block", config=cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    layers = _find_layers(float_model, out, record.skips)
    train, held = _split(batches, cfg.held_out)
    record.samples = sum(len(next(iter(f.values()))) for f in train)
    record.held_out = sum(len(next(iter(f.values()))) for f in held)
    if not layers or not held:
        if layers and not held:
            record.skips.append(Skip("(model)", "too few calibration samples to hold some out"))
        record.layers, record.seconds = [], time.monotonic() - began
        return qdq, record
    index = GraphIndex(out.graph)
    qsteps = _Stepper(out, [lay.qdq_index for lay in layers], train + held)
    fsteps = _Stepper(float_model, [lay.float_index for lay in layers], train + held)
    n_train = len(train)
    plan = blocks(float_model, out, layers) if blocks is not None else {}
    by_block: dict[int, LayerRounding] = {}  # second layers of blocks, learned with the first
    with Progress(len(layers), "learned rounding") as bar:
        for j, lay in enumerate(layers):
            xq = [np.asarray(a, np.float32) for a in qsteps.inputs(j)]
            xf = [np.asarray(a, np.float32) for a in fsteps.inputs(j)]
            if j in by_block:
                rows = [by_block.pop(j)]
            elif j in plan:
                second, learn = plan[j]
                rows = learn(xq, xf, n_train, cfg, gen, index)
                by_block[second] = rows[1]
            else:
                rows = [_learn_layer(lay, xq, xf, n_train, cfg, gen, index)[0]]
            record.layers.append(rows[0])
            qsteps.layer(j)
            fsteps.layer(j)
            bar.update(1, mse=rows[0].loss_learned)
    learned_out = qsteps.finish()[n_train:]
    reference = fsteps.finish()[n_train:]
    del qsteps, fsteps
    session = verify.session(qdq)
    names = [o.name for o in qdq.graph.output]
    nearest_out = [session.run(names, feeds) for feeds in held]
    record.sqnr_nearest = _sqnr(reference, nearest_out)
    record.sqnr_learned = _sqnr(reference, learned_out)
    record.kept = record.sqnr_learned > record.sqnr_nearest
    record.seconds = time.monotonic() - began
    log(record.summary())
    return (out if record.kept else qdq), record


def _learn_layer(lay: _Layer, xq, xf, n_train: int, cfg: AdaRoundConfig, gen: torch.Generator,
                 index: GraphIndex | None) -> tuple[LayerRounding, torch.Tensor]:
    """Learn one layer (AdaRound); its row and the codes it keeps (learned or nearest), written
    into ``index``'s model when learned (None: not written)."""
    learn = _learn_moments if _moment_form(lay, xq[0]) else _learn_minibatch
    began = time.monotonic()
    codes, fit, check, r = learn(lay, xq[:n_train], xf[:n_train], xq[n_train:], xf[n_train:],
                                 cfg, gen)
    # kept when it also lowers the error on the held-out samples: a layer that sees few
    # positions (an SE block's 1x1 convs on pooled features) can overfit
    keep = check[1] < check[0] and fit[1] < fit[0]
    if keep and index is not None:
        _write(lay, codes, index)
    row = LayerRounding(lay.node, lay.op_type, int(lay.codes.size), fit[0], fit[1], check[0],
                        check[1], _changed(lay, codes), keep,
                        "moments" if learn is _learn_moments else "minibatch", r.iterations,
                        time.monotonic() - began)
    return row, (codes if keep else r.nearest)


def _onnx_codes(lay: _Layer, codes: torch.Tensor) -> np.ndarray:
    """Learned codes (torch layout) as the layer's ONNX initializer (layout and dtype)."""
    return np.ascontiguousarray(_torch_layout(lay, codes.numpy())).astype(lay.codes.dtype)


def _changed(lay: _Layer, codes: torch.Tensor) -> int:
    return int(np.sum(_onnx_codes(lay, codes) != lay.codes))


def _write(lay: _Layer, codes: torch.Tensor, index: GraphIndex) -> int:
    """Write the codes into the model; the number that differ from nearest."""
    index.set_const(lay.codes_name, _onnx_codes(lay, codes))
    return _changed(lay, codes)
