"""Fold per-channel affine ops into the preceding Conv, ConvTranspose or Gemm.

An affine op z = t * (y - m) + c, with t, m, c per output channel of the layer y = W * x + b:

    BatchNormalization (inference)   t = gamma / sqrt(var + eps), m = mean, c = beta
    y * k, k * y, y / k              t = k or 1 / k                                 (m = c = 0)
    y + k, k + y, y - k, k - y       t = 1, c = k; y - k: m = k; k - y: t = -1, c = k

(k a float constant that is a scalar or per channel: [C, 1, ...], [1, C, 1, ...], a Gemm's
[C]). The fold is exact algebra:

    W'[o] = t[o] * W[o]            (Conv: axis 0; ConvTranspose [Cin, Cout/g, ...]: the output
                                    slice of each group; Gemm: the output column of op(B))
    b'    = t * (b - m) + c        (b = 0 for a layer without bias; Gemm: beta_gemm * C)

computed in float64 and written back once in the weight's dtype. :class:`FoldBatchNorm` folds
BatchNormalization only; :class:`FoldAffine` also the Mul/Add/Sub/Div (quantization folds them:
left in float they sit between a DequantizeLinear and a QuantizeLinear and block onnxruntime's
integer kernels; e.g. the bias Add of a Paddle ConvTranspose, PP-LCNetV3's scalar affine pairs).
Opsets 11..latest: BN-9's optional training outputs, BN-14/15's ``training_mode`` attribute and
mixed parameter dtypes are handled. A BN is left alone, with the reason, when its input is not
such a layer, when the layer's output has other readers or is a graph output, when a weight or
bias is shared or not constant, or when it runs in training mode; a Mul/Add/Sub/Div that does
not fold is an ordinary op and is not reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxrep.ir.graph import GraphIndex, attr, is_onnx, remove_unused_constants, set_attr
from onnxrep.ir.layers import out_channels, write_const_input
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
ARITHMETIC = ("Mul", "Add", "Sub", "Div")


@dataclass(frozen=True)
class FoldSummary:
    folded: int  # affine ops folded into the layer before them
    unused_removed: int  # constants nobody reads any more, removed


class FoldAffine(Pass):
    name = "fold-affine"
    contract = Contract.EQUIVALENT
    ops: tuple[str, ...] = ("BatchNormalization",) + ARITHMETIC

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        changes: list[Change] = []
        while True:  # sweeps: an op behind an op just folded becomes foldable in the next one
            index = GraphIndex(graph)
            skips, folded = [], []
            for i, node in enumerate(graph.node):
                if node.op_type not in self.ops or not is_onnx(node):
                    continue
                plan = _plan(index, i)
                if isinstance(plan, str):
                    if node.op_type == "BatchNormalization":
                        skips.append(Skip(index.labels[i], plan))
                    continue
                held = self.held(index.labels[i])
                if held:
                    skips.append(held)
                    continue
                detail = _fold(index, i, *plan)
                changes.append(Change("folded", (index.labels[i], index.labels[plan[0]]),
                                      detail))
                folded.append(i)
            for i in sorted(folded, reverse=True):
                del graph.node[i]
            if not folded:
                break
        removed = remove_unused_constants(graph) if changes else 0
        return PassResult(model, changes, skips, FoldSummary(len(changes), removed))


class FoldBatchNorm(FoldAffine):
    name = "fold-bn"
    ops = ("BatchNormalization",)


def fold_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every foldable BatchNormalization folded; ``model`` is untouched."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    FoldBatchNorm()(work)
    return work


def _plan(index: GraphIndex, i: int):
    """``(layer, t, m, c)`` folding node ``i`` into the layer before it, or why it cannot."""
    node = index.node(i)
    if node.op_type == "BatchNormalization":
        reason = _bn_problem(node, index)
        if reason is not None:
            return reason
        y, k = node.input[0], None
    else:
        y, k = _operands(index, node)
        if y is None:
            return "it is not an op of a computed tensor and a constant"
    layer = _layer(index, y)
    if isinstance(layer, str):
        return layer
    layer, channels, rank = layer
    if k is None:
        affine = _bn_affine(index, node, layer, channels)
    else:
        affine = _arithmetic_affine(node, y, k, channels, rank)
    return affine if isinstance(affine, str) else (layer, *affine)


def _bn_problem(bn: onnx.NodeProto, index: GraphIndex) -> str | None:
    if attr(bn, "training_mode", 0):
        return "training_mode=1 (batch statistics, not a fixed affine map)"
    if any(out for out in bn.output[1:]):
        return "it has training-mode outputs (running or saved mean/var)"
    if len(bn.input) < 5 or not all(bn.input[1:5]):
        return "scale, bias, mean or var input is missing"
    if not all(index.is_const(name) for name in bn.input[1:5]):
        return "scale, bias, mean or var is not a constant"
    return None


def _operands(index: GraphIndex, node: onnx.NodeProto) -> tuple[str | None, np.ndarray | None]:
    """(computed operand, constant operand) of a binary op, or (None, None)."""
    if len(node.input) != 2:
        return None, None
    a, b = node.input
    if index.is_const(a) == index.is_const(b):
        return None, None
    return (b, index.const(a)) if index.is_const(a) else (a, index.const(b))


def _layer(index: GraphIndex, y: str) -> tuple[int, int, int] | str:
    """(layer, output channels, output rank) of the foldable layer producing ``y`` alone, or why
    there is none."""
    if y not in index.producer:
        return f"its input '{y}' is a graph input"
    layer = index.producer[y]
    lnode = index.node(layer)
    label = _label(index, layer)
    if lnode.op_type not in FOLDABLE or not is_onnx(lnode):
        return f"its input comes from {label}, not a Conv, ConvTranspose or Gemm"
    if y in index.graph_outputs:
        return f"the output of {label} is also a graph output"
    if len(index.readers(y)) > 1:
        return f"the output of {label} is also read by {len(index.readers(y)) - 1} other node(s)"
    if len(lnode.input) < 2 or not index.is_const(lnode.input[1]):
        return f"the weight of {label} is not a constant"
    if index.shared(lnode.input[1]):
        return f"the weight of {label} is shared by {len(index.readers(lnode.input[1]))} nodes"
    bias = lnode.input[2] if len(lnode.input) > 2 and lnode.input[2] else None
    if bias is not None and not index.is_const(bias):
        return f"the bias of {label} is not a constant"
    if bias is not None and index.shared(bias):
        return f"the bias of {label} is shared by {len(index.readers(bias))} nodes"
    dtype, shape = index.const_info(lnode.input[1])
    if not np.issubdtype(dtype, np.floating):
        return f"the weight of {label} is not float ({dtype})"
    channels = out_channels(lnode, shape)
    if channels is None:
        return f"{label} has an unsupported weight layout"
    if lnode.op_type == "Gemm" and bias is not None:
        c_shape = index.const_info(bias)[1]
        try:
            np.broadcast_shapes(c_shape, (channels,))
        except ValueError:
            return f"the bias C of {label} (shape {list(c_shape)}) is not per output column"
    return layer, channels, 2 if lnode.op_type == "Gemm" else len(shape)


def _label(index: GraphIndex, layer: int) -> str:
    return f"{index.node(layer).op_type} '{index.labels[layer]}'"


def _bn_affine(index: GraphIndex, bn: onnx.NodeProto, layer: int, channels: int):
    """(t, m, c) of a BatchNormalization, or why it does not fit ``layer``."""
    gamma, beta, mean, var = (index.const(n).astype(np.float64).reshape(-1)
                              for n in bn.input[1:5])
    if any(p.size != channels for p in (gamma, beta, mean, var)):
        return f"BN has {gamma.size} channels, {_label(index, layer)} produces {channels}"
    return gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5))), mean, beta


def _arithmetic_affine(node: onnx.NodeProto, y: str, k: np.ndarray, channels: int, rank: int):
    """(t, m, c) of ``y op k`` (or ``k op y``), or why it is not a per-channel affine map."""
    if not np.issubdtype(k.dtype, np.floating) or k.ndim > rank:
        return "its constant is not a float that broadcasts per channel"
    shape = (1,) * (rank - k.ndim) + k.shape
    if any(s != 1 for axis, s in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return "its constant is not per channel"
    k = np.broadcast_to(k.astype(np.float64).reshape(-1), (channels,))
    zero, one, first = np.zeros(channels), np.ones(channels), node.input[0] == y
    if node.op_type == "Mul":
        return k, zero, zero
    if node.op_type == "Add":
        return one, zero, k
    if node.op_type == "Sub":
        return (one, k, zero) if first else (-one, zero, k)
    if first and np.all(k != 0):  # Div
        return 1.0 / k, zero, zero
    return "it is k / y or a division by zero"


def _fold(index: GraphIndex, i: int, layer: int, t: np.ndarray, m: np.ndarray,
          c: np.ndarray) -> str:
    """Fold ``t * (y - m) + c`` (node ``i``) into ``layer`` and rewire; returns a short
    description."""
    node = index.node(layer)
    w = index.const(node.input[1])
    index.set_const(node.input[1], scale_outputs(node, w.astype(np.float64), t))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    old = np.zeros(t.size) if bias is None else index.const(bias).astype(np.float64)
    if node.op_type == "Gemm":
        old = old * float(attr(node, "beta", 1.0))
        set_attr(node, "beta", 1.0)
    if not (old.ndim == 2 and old.shape[0] > 1):  # a per-row Gemm C [M, N] stays 2-D
        old = old.reshape(-1)
    write_const_input(index, node, 2, (old - m) * t + c, f"{node.output[0]}_bias")
    node.output[0] = index.node(i).output[0]
    return f"t in [{t.min():.3g}, {t.max():.3g}]"


def scale_outputs(node: onnx.NodeProto, w: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``w`` with each output channel ``o`` of the layer multiplied by ``t[o]``."""
    if node.op_type == "Conv":
        return w * t.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op_type == "ConvTranspose":  # [Cin, Cout/g, k...]; output o = g * Cout/g + j
        g = int(attr(node, "group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w.reshape((g, cin // g, cout_g) + w.shape[2:])
        factor = t.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))
        return (grouped * factor).reshape(w.shape)
    return w * (t[:, None] if attr(node, "transB", 0) else t[None, :])  # Gemm


