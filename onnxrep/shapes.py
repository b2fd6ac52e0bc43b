"""Static shapes by ONNX shape inference, run on a weight-less copy so it costs no memory."""

from __future__ import annotations

import onnx

_KEEP_ELEMENTS = 64  # small constants (shapes, axes) keep their data: inference reads them


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """``{tensor name: shape}`` with ints for known dims and None for unknown ones."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        graph.initializer.append(_dims_only(t))
    for node in model.graph.node:
        copy = graph.node.add()
        copy.CopyFrom(node) if node.op_type != "Constant" else _light_constant(node, copy)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                   for d in v.type.tensor_type.shape.dim)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _dims_only(t: onnx.TensorProto) -> onnx.TensorProto:
    n = 1
    for d in t.dims:
        n *= d
    if n <= _KEEP_ELEMENTS:
        return t
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)


def _light_constant(node: onnx.NodeProto, copy: onnx.NodeProto) -> None:
    copy.CopyFrom(node)
    for a in copy.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            a.t.CopyFrom(_dims_only(a.t))
