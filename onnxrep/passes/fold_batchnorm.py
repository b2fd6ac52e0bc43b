"""Fold inference-mode BatchNormalization into the preceding Conv, ConvTranspose or Gemm.

BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = t * y + (beta - t * mean) per channel,
t = gamma / sqrt(var + eps). With y = W * x + b the fold is exact algebra:

    W'[o] = t[o] * W[o]            (Conv: axis 0; ConvTranspose [Cin, Cout/g, ...]: the output
                                    slice of each group; Gemm: the output column of op(B))
    b'    = t * (b - mean) + beta  (b = 0 for a layer without bias; Gemm: beta_gemm * C)

computed in float64 and written back once in the weight's dtype. Opsets 11..latest: BN-9's
optional training outputs, BN-14/15's ``training_mode`` attribute and mixed parameter dtypes
are handled. A BN is left alone, with the reason, when its input is not such a layer, when the
layer's output has other readers or is a graph output, when a weight or bias is shared or not
constant, or when it runs in training mode.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxrep.model import GraphIndex, attr, set_attr
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


class FoldBatchNorm(Pass):
    name = "fold-bn"
    contract = Contract.EQUIVALENT

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        changes: list[Change] = []
        while True:  # sweeps: a BN behind a BN just folded becomes foldable in the next one
            index = GraphIndex(graph)
            skips, folded = [], []
            for i, node in enumerate(graph.node):
                if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                    continue
                reason = _problem(index, i)
                if reason is None:
                    layer = index.producer[node.input[0]]
                    detail = _fold(index, layer, i)
                    changes.append(Change("folded", (index.labels[i], index.labels[layer]),
                                          detail))
                    folded.append(i)
                else:
                    skips.append(Skip(index.labels[i], reason))
            for i in sorted(folded, reverse=True):
                del graph.node[i]
            if not folded:
                break
        removed = remove_unused_constants(graph) if changes else 0
        return PassResult(model, changes, skips,
                          {"folded": len(changes), "unused constants removed": removed})


def fold_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every foldable BatchNormalization folded; ``model`` is untouched."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    FoldBatchNorm()(work)
    return work


def _problem(index: GraphIndex, i: int) -> str | None:
    """Why BN node ``i`` cannot be folded, or None."""
    bn = index.node(i)
    if attr(bn, "training_mode", 0):
        return "training_mode=1 (batch statistics, not a fixed affine map)"
    if any(out for out in bn.output[1:]):
        return "it has training-mode outputs (running or saved mean/var)"
    if len(bn.input) < 5 or not all(bn.input[1:5]):
        return "scale, bias, mean or var input is missing"
    params = [index.const(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return "scale, bias, mean or var is not a constant"
    y = bn.input[0]
    if y not in index.producer:
        return f"its input '{y}' is a graph input"
    layer = index.producer[y]
    lnode = index.node(layer)
    label = f"{lnode.op_type} '{index.labels[layer]}'"
    if lnode.op_type not in FOLDABLE or lnode.domain not in ("", "ai.onnx"):
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
    w = index.const(lnode.input[1])
    if not np.issubdtype(w.dtype, np.floating):
        return f"the weight of {label} is not float ({w.dtype})"
    channels = _out_channels(lnode, w)
    if channels is None:
        return f"{label} has an unsupported weight layout"
    if any(p.size != channels for p in params):
        return f"BN has {params[0].size} channels, {label} produces {channels}"
    if lnode.op_type == "Gemm" and bias is not None:
        c = index.const(bias)
        try:
            np.broadcast_shapes(c.shape, (channels,))
        except ValueError:
            return f"the bias C of {label} (shape {list(c.shape)}) is not per output column"
    return None


def _out_channels(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return w.shape[0]
    if node.op_type == "ConvTranspose":
        return w.shape[1] * int(attr(node, "group", 1))
    if w.ndim != 2:
        return None
    return w.shape[0] if attr(node, "transB", 0) else w.shape[1]


def _fold(index: GraphIndex, layer: int, i: int) -> str:
    """Fold BN ``i`` into ``layer`` and rewire; returns a short description."""
    bn, node = index.node(i), index.node(layer)
    gamma, beta, mean, var = (index.const(n).astype(np.float64).reshape(-1)
                              for n in bn.input[1:5])
    t = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    w = index.const(node.input[1])
    index.set_const(node.input[1], scale_outputs(node, w.astype(np.float64), t))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    old = np.zeros(t.size) if bias is None else index.const(bias).astype(np.float64)
    if node.op_type == "Gemm":
        old = old * float(attr(node, "beta", 1.0))
        if bias is not None and old.ndim == 2 and old.shape[0] > 1:  # per-row C: [M, N]
            new = (old - mean) * t + beta
        else:
            new = (old.reshape(-1) - mean) * t + beta
        set_attr(node, "beta", 1.0)
    else:
        new = (old.reshape(-1) - mean) * t + beta
    write_const_input(index, node, 2, new, f"{node.output[0]}_bias")
    node.output[0] = bn.output[0]
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


def write_const_input(index: GraphIndex, node: onnx.NodeProto, slot: int, value: np.ndarray,
                      base: str) -> None:
    """Make ``node.input[slot]`` the constant ``value`` (in the layer weight's dtype): in place
    when a constant with as many elements is there, else as a new initializer (a replaced one
    is dropped when nothing else reads it)."""
    old = node.input[slot] if len(node.input) > slot else ""
    info = index.const_info(old) if old else None
    if info is not None and int(np.prod(info[1], dtype=np.int64)) == value.size:
        index.set_const(old, value.reshape(info[1]))
        return
    dtype = info[0] if info is not None else index.const_info(node.input[1])[0]
    name = unique_name(index, base)
    tensor = numpy_helper.from_array(np.asarray(value).astype(dtype), name)
    index.graph.initializer.append(tensor)
    index.initializers[name] = index.graph.initializer[-1]
    if old in index.initializers and len(index.readers(old)) == 1:
        for k, t in enumerate(index.graph.initializer):
            if t.name == old:
                del index.graph.initializer[k]
                break
        del index.initializers[old]
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def unique_name(index: GraphIndex, base: str) -> str:
    taken = set(index.producer) | set(index.initializers) | index.graph_inputs
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def remove_unused_constants(graph: onnx.GraphProto) -> int:
    """Drop initializers and Constant nodes no node reads any more (graph inputs and outputs
    kept); returns how many were removed."""
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    inputs = {v.name for v in graph.input}
    keep = [t for t in graph.initializer if t.name in used or t.name in inputs]
    removed = len(graph.initializer) - len(keep)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    for i in reversed(range(len(graph.node))):
        n = graph.node[i]
        if n.op_type == "Constant" and not any(o in used for o in n.output):
            del graph.node[i]
            removed += 1
    return removed


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read from inside If/Loop/Scan bodies (outer-scope references)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= {name for n in g.node for name in n.input} | _subgraph_inputs(g)
    return names
