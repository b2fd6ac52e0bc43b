"""Export a fake-quantized graph as an ONNX QDQ model that onnxruntime runs in int8.

For every fake-quant layer (see :mod:`onnxrep.training.fake_quant`), with its BatchNormalization
folded in (W' = W f, b' = (b - mean) f + beta, f = gamma / sqrt(var + eps)) and the fused BN
node removed:

- weight: int8 codes round(q(W') / s_w) as an initializer -> DequantizeLinear (zero point 0,
  ``axis`` = output channel when per-channel);
- bias: int32 codes round(b' / (s_x s_w)) -> DequantizeLinear with scale s_x s_w, the form
  onnxruntime fuses into QLinearConv / QGemm (s_x: the layer input's activation scale); a
  float initializer when the target keeps biases float (TensorRT) or the input is float;
- every quantized activation tensor t: QuantizeLinear(t, s, z) -> DequantizeLinear in the
  target's code type (uint8, or int8 with z = 0 for TensorRT), and every reader of t reads the
  DequantizeLinear output.

The caller applies the target's post-processing and rule check to the result
(``Target.finish``, ``Target.violations``; :func:`onnxrep.training.train.qat` does).

A BatchNormalization that was not fused (not after a Conv) becomes Mul + Add, so no
BatchNormalization is left. The float weights the quantized ones replace are removed. With
onnxruntime's graph optimizations on, DQ -> Conv [-> Relu] -> Q becomes QLinearConv.
Dequantized weights equal the fake-quantized ones bit for bit, so the exported model computes
what the torch model trained (up to float summation order and onnxruntime's integer
requantization).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxrep.errors import UnsupportedModelError
from onnxrep.ir.graph import unique_name
from onnxrep.ir.model import opset_version
from onnxrep.progress import log
from onnxrep.training.fake_quant import INT32_MAX, QuantLayer, QuantPlan
from onnxrep.ir.shapes import infer_shapes


class _Builder:
    """New initializers and nodes with names unique in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {
            v.name for v in graph.output} | {n.name for n in graph.node} | {
            o for n in graph.node for o in (*n.input, *n.output)}
        self.inits: list[onnx.TensorProto] = []

    def name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def dequantize(self, base: str, codes, scale, zero_point, axis=None) -> onnx.NodeProto:
        inputs = [self.const(f"{base}_quantized", codes), self.const(f"{base}_scale", scale),
                  self.const(f"{base}_zero_point", zero_point)]
        extra = {} if axis is None else {"axis": axis}
        return helper.make_node("DequantizeLinear", inputs,
                                [self.name(f"{base}_DequantizeLinear_Output")],
                                name=self.name(f"{base}_DequantizeLinear"), **extra)


def export_qdq(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The QDQ model of ``plan``'s current state. ``model`` (not modified) must be the model the
    planned graph module was converted from."""
    if any(layer.axis is not None for layer in plan.layers) and opset_version(model) < 13:
        raise UnsupportedModelError("per-channel QDQ needs opset >= 13; convert the model with "
                                    "onnx.version_converter.convert_version(model, 13)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    build = _Builder(graph)
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> DQ nodes to put before it
    replaced: dict[int, list[onnx.NodeProto]] = {}  # node index -> nodes replacing it
    clamped = 0
    for layer in plan.layers:
        node = graph.node[layer.layer.node_index]
        dq, n = _quantize_layer(layer, node, build)
        before[layer.layer.node_index] = dq
        clamped += n
        if layer.bn is not None:
            bn_node = graph.node[layer.bn.node_index]
            node.output[0] = bn_node.output[0]
            replaced[layer.bn.node_index] = []
    shapes = infer_shapes(model) if plan.batchnorms else {}
    for bn in plan.batchnorms:
        replaced[bn.node_index] = _affine(bn, graph.node[bn.node_index], shapes, build)
    if clamped:
        log(f"export: {clamped} bias values exceeded int32 at scale s_x * s_w and were clamped")
    nodes = _with_activation_qdq(graph, plan, build, before, replaced)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(build.inits)
    _drop_unused(graph)
    onnx.checker.check_model(out)
    return out


def _quantize_layer(layer: QuantLayer, node: onnx.NodeProto, build: _Builder
                    ) -> tuple[list[onnx.NodeProto], int]:
    """Point ``node`` at a dequantized int8 weight and int32 bias; returns (the DQ nodes, the
    number of bias values clamped to int32)."""
    q = layer.quantized()
    inner = layer.layer
    base = inner.onnx_names["weight"]
    axis = inner.onnx_weight_axis() if layer.axis is not None else None
    w_scale = _scale(q.weight_scale, axis)
    nodes = [build.dequantize(base, inner.to_onnx(q.weight, None)[base], w_scale,
                              np.zeros(w_scale.shape, np.int8), axis)]
    node.input[1] = nodes[0].output[0]
    clamped = 0
    bias_base = inner.onnx_names.get("bias", f"{base}_bias")
    if q.bias is not None:
        b_scale = _scale(q.bias_scale, axis)
        codes = q.bias.numpy()
        clamped = int(np.sum(np.abs(codes.astype(np.int64)) >= INT32_MAX))
        nodes.append(build.dequantize(bias_base, codes, b_scale, np.zeros(b_scale.shape,
                                                                          np.int32),
                                      None if axis is None else 0))
        bias = nodes[-1].output[0]
    elif q.float_bias is not None:
        bias = build.const(bias_base, q.float_bias.detach().numpy().astype(np.float32))
    else:
        return nodes, 0
    if len(node.input) > 2:
        node.input[2] = bias
    else:
        node.input.append(bias)
    return nodes, clamped


def _scale(scale: torch.Tensor, axis: int | None) -> np.ndarray:
    s = scale.detach().numpy().astype(np.float32)
    return s.reshape(()) if axis is None else s


def _affine(bn, node: onnx.NodeProto, shapes: dict, build: _Builder) -> list[onnx.NodeProto]:
    """An unfused BatchNormalization as y = x * k + c, k and c shaped [C, 1, ...]."""
    rank = len(shapes.get(node.input[0]) or ())
    if rank < 2:
        raise UnsupportedModelError(f"{bn.label}: rank of its input unknown; cannot write the "
                                    "BatchNormalization as Mul + Add")
    with torch.no_grad():
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        c = bn.bias - bn.running_mean * k
    shape = (-1,) + (1,) * (rank - 2)
    k_name = build.const(f"{node.output[0]}_scale", k.numpy().reshape(shape).astype(np.float32))
    c_name = build.const(f"{node.output[0]}_shift", c.numpy().reshape(shape).astype(np.float32))
    mid = build.name(f"{node.output[0]}_scaled")
    return [helper.make_node("Mul", [node.input[0], k_name], [mid], name=build.name(
                f"{bn.label}_mul")),
            helper.make_node("Add", [mid, c_name], [node.output[0]], name=build.name(
                f"{bn.label}_add"))]


def _with_activation_qdq(graph: onnx.GraphProto, plan: QuantPlan, build: _Builder,
                         before: dict, replaced: dict) -> list[onnx.NodeProto]:
    """The node list with Q -> DQ after each quantized tensor's producer (graph inputs first)
    and readers renamed to the DQ outputs."""
    pairs: dict[str, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}
    for tensor, act in plan.activations.items():
        scale, zero_point = act.qparams()
        s = build.const(f"{tensor}_scale", scale.numpy().reshape(()).astype(np.float32))
        z = build.const(f"{tensor}_zero_point",
                        zero_point.numpy().reshape(()).astype(act.zero_point_dtype))
        q_out = build.name(f"{tensor}_QuantizeLinear_Output")
        dq_out = build.name(f"{tensor}_DequantizeLinear_Output")
        pairs[tensor] = [
            helper.make_node("QuantizeLinear", [tensor, s, z], [q_out],
                             name=build.name(f"{tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out],
                             name=build.name(f"{tensor}_DequantizeLinear"))]
        renamed[tensor] = dq_out
    nodes: list[onnx.NodeProto] = []
    for v in graph.input:
        nodes.extend(pairs.get(v.name, []))
    for i, node in enumerate(graph.node):
        for new in (*before.get(i, []), *replaced.get(i, [node])):
            for k, name in enumerate(new.input):
                if name in renamed:
                    new.input[k] = renamed[name]
            nodes.append(new)
            for name in new.output:
                nodes.extend(pairs.get(name, []))
    return nodes


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers (and their graph-input entries, for old IR versions) and Constant
    nodes that no node or graph output reads any more."""
    used = {n for node in graph.node for n in node.input} | {v.name for v in graph.output}
    keep = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    removed = {t.name for t in graph.initializer if t.name not in used}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [v for v in graph.input if v.name not in removed]
    del graph.input[:]
    graph.input.extend(inputs)
