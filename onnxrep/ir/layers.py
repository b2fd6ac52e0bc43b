"""Layer algebra every pass shares: the one copy of channel counts, padding, Flatten features
and bias edits for Conv, ConvTranspose, Gemm and MatMul.

Weight layouts (ONNX): Conv ``[Cout, Cin/g, k...]``; ConvTranspose ``[Cin, Cout/g, k...]``;
Gemm ``[K, N]`` (``[N, K]`` with ``transB``); MatMul ``[..., K, N]``. A bias edit folds Gemm's
``beta`` into the bias first, so ``b' = beta * b + delta`` with ``beta`` then 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxrep.ir.graph import GraphIndex, attr, set_attr, unique_name


def out_channels(node: onnx.NodeProto, shape: tuple) -> int | None:
    """Output channels of a weight layer with weight ``shape`` (None for a MatMul of rank > 2)."""
    if node.op_type == "Conv":
        return shape[0]
    if node.op_type == "ConvTranspose":
        return shape[1] * int(attr(node, "group", 1))
    if len(shape) != 2:
        return None
    return shape[0] if attr(node, "transB", 0) else shape[1]


def in_channels(node: onnx.NodeProto, shape: tuple) -> int:
    """Input channels (features for Gemm/MatMul) a weight layer with weight ``shape`` reads."""
    if node.op_type == "Conv":
        return shape[1] * int(attr(node, "group", 1))
    if node.op_type == "ConvTranspose":
        return shape[0]
    return shape[1] if node.op_type == "Gemm" and attr(node, "transB", 0) else shape[-2]


def padding(node: onnx.NodeProto) -> str | None:
    """How a Conv or pooling node pads its input (``"pads [1, 1, 1, 1]"``, ``"auto_pad
    SAME_UPPER"``), or None when every tap reads the input itself."""
    pads = attr(node, "pads", None)
    if pads is not None and any(pads):
        return f"pads {list(pads)}"
    auto = attr(node, "auto_pad", b"NOTSET")
    if auto not in (b"NOTSET", b"VALID"):
        return f"auto_pad {auto.decode()}"
    return None


def flatten_features(node: onnx.NodeProto, tensor: str, shapes: dict
                     ) -> tuple[int | None, str | None]:
    """(H*W, None) when the Flatten or Reshape ``node`` maps ``tensor`` ``[N, C, H, W...]`` to
    ``[N, C*H*W]``, so channel c becomes features ``c*HW .. (c+1)*HW - 1``; else (None, why)."""
    src, dst = shapes.get(tensor), shapes.get(node.output[0])
    if src is None or len(src) < 2 or any(d is None for d in src[1:]):
        return None, "input shape is not statically known"
    if node.op_type == "Flatten" and attr(node, "axis", 1) != 1:
        return None, "Flatten axis is not 1"
    hw = int(np.prod(src[2:], dtype=np.int64))
    if dst is None or len(dst) != 2 or dst[1] != src[1] * hw:
        return None, "output is not [batch, channels * spatial]"
    return hw, None


def add_to_bias(index: GraphIndex, node: onnx.NodeProto, delta: np.ndarray) -> None:
    """Add ``delta`` (one value per output channel) to the layer's bias, creating it if absent;
    Gemm's ``beta`` is folded in first."""
    b = np.zeros(delta.size)
    if len(node.input) > 2 and node.input[2]:
        b = np.broadcast_to(index.const(node.input[2]).astype(np.float64).reshape(-1),
                            delta.shape)
    if node.op_type == "Gemm":
        b = b * float(attr(node, "beta", 1.0))
        set_attr(node, "beta", 1.0)
    write_const_input(index, node, 2, b + delta, f"{node.output[0]}_bias")


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
    name = unique_name(base, set(index.producer) | set(index.initializers) | index.graph_inputs)
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
