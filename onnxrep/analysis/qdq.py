"""Which nodes a QDQ model quantizes."""

from __future__ import annotations

import onnx

from onnxrep.ir.graph import GraphIndex


def quantized_nodes(qdq: onnx.ModelProto) -> list[str]:
    """Names of the nodes onnxruntime quantized: every float activation input comes from a
    DequantizeLinear, and the node has a quantized constant (weight) or a quantized output.
    An excluded Conv (float weight) or a float op that merely reads a DQ'd tensor (a Sigmoid
    after the last conv) is not listed."""
    index = GraphIndex(qdq.graph)
    dq_out = {o: n for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16)
    non_float = {t.name for t in qdq.graph.initializer if t.data_type not in floats}
    names = []
    for n in qdq.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # float constants read directly (TensorRT's float biases) are not activations
        inputs = [x for x in n.input if x and x not in non_float
                  and (x in dq_out or not index.is_const(x))]
        if not inputs or not all(x in dq_out for x in inputs):
            continue
        weight = any(index.is_const(dq_out[x].input[0]) for x in inputs)
        output_q = any(qdq.graph.node[j].op_type == "QuantizeLinear"
                       for o in n.output for j in index.readers(o))
        if weight or output_q:
            names.append(n.name)
    return names
