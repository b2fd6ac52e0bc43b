"""Static shapes and types by ONNX shape inference, run on a weight-less copy (no memory cost)."""

from __future__ import annotations

import onnx

_KEEP_ELEMENTS = 64  # small constants (shapes, axes) keep their data: inference reads them


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """``{tensor name: shape}`` with ints for known dims and None for unknown ones."""
    return {name: shape for name, (_, shape) in infer_types(model).items() if shape is not None}


def infer_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """``{tensor name: (elem_type, shape or None)}`` for inputs, outputs, intermediate tensors
    and initializers; where inference fails (unknown ops), what the model declares."""
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
        graph = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True).graph
    except Exception:  # unknown ops or broken value infos: keep what is declared
        pass
    types = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.elem_type:
            shape = (tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                     if tt.HasField("shape") else None)
            types[v.name] = (tt.elem_type, shape)
    for t in model.graph.initializer:
        types[t.name] = (t.data_type, tuple(t.dims))
    return types


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
