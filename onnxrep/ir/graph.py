"""Graph queries over a ``ModelProto``: attributes with ONNX's defaults, fresh names, and
:class:`GraphIndex`, which answers "who produces / who reads this tensor" and reads or writes
constant weights whether they live in initializers or in ``Constant`` nodes.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

_RAW_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is in the default ONNX operator set (not a custom domain)."""
    return node.domain in ONNX_DOMAINS


def attr(node: onnx.NodeProto, name: str, default=None):
    """Attribute value with ONNX's default when absent (e.g. ``group`` -> 1)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def unique_name(base: str, taken: set) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken``; records it."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A stable human name: the node's name, or ``<op>#<index>`` when it has none."""
    return node.name or f"{node.op_type}#{index}"


class GraphIndex:
    """Producers, consumers and constants of a graph's top level.

    Built once per pass; after a pass rewires nodes, build a new one. Constant tensors are
    initializers and outputs of ``Constant`` nodes; ``set_const`` writes back in place.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.labels = [node_label(n, i) for i, n in enumerate(graph.node)]

    def node(self, index: int) -> onnx.NodeProto:
        return self.graph.node[index]

    def readers(self, tensor: str) -> list[int]:
        return self.consumers.get(tensor, [])

    def is_const(self, tensor: str) -> bool:
        if tensor in self.initializers:
            return tensor not in self.graph_inputs
        i = self.producer.get(tensor)
        return i is not None and self.graph.node[i].op_type == "Constant" and _constant_tensor(
            self.graph.node[i]) is not None

    def const(self, tensor: str) -> np.ndarray | None:
        """The constant value of ``tensor``, or None when it is computed or overridable."""
        if not tensor or not self.is_const(tensor):
            return None
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        return numpy_helper.to_array(_constant_tensor(self.graph.node[self.producer[tensor]]))

    def const_info(self, tensor: str) -> tuple[np.dtype, tuple] | None:
        """``(dtype, shape)`` of a constant, without decoding its data."""
        if not tensor or not self.is_const(tensor):
            return None
        proto = self.initializers.get(tensor) or _constant_tensor(
            self.graph.node[self.producer[tensor]])
        return _np_dtype(proto.data_type), tuple(proto.dims)

    def set_const(self, tensor: str, value: np.ndarray) -> None:
        """Replace a constant's value in place (same shape), keeping its dtype."""
        proto = self.initializers.get(tensor) or _constant_tensor(
            self.graph.node[self.producer[tensor]])
        if tuple(proto.dims) != tuple(np.shape(value)):
            raise ValueError(f"set_const('{tensor}'): shape {np.shape(value)} != {tuple(proto.dims)}")
        array = np.ascontiguousarray(value, dtype=_np_dtype(proto.data_type))
        if proto.data_type in _RAW_TYPES and sys.byteorder == "little":
            for name in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data"):
                proto.ClearField(name)
            proto.raw_data = array.tobytes()
        else:
            proto.CopyFrom(numpy_helper.from_array(array, proto.name))

    def shared(self, tensor: str) -> bool:
        """True when a constant is read by more than one node (scaling it would leak)."""
        return len(self.readers(tensor)) > 1


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
    return None


def _np_dtype(data_type: int) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type)


SUBGRAPH_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def subgraph_layers(graph: onnx.GraphProto, where: str = "") -> list[tuple[str, str]]:
    """(layer label, where) for every Conv/ConvTranspose/Gemm/MatMul inside an If/Loop/Scan
    body, at any depth: onnxrep's passes work on the main graph only and leave these alone."""
    found = []
    for i, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}#{i}"
        for a in node.attribute:
            bodies = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for body in bodies:
                inside = f"{where} > " if where else ""
                here = f"{inside}{node.op_type} '{label}' {a.name}"
                for j, n in enumerate(body.node):
                    if n.op_type in SUBGRAPH_LAYER_OPS and n.domain in ("", "ai.onnx"):
                        found.append((n.name or f"{n.op_type}#{j}", here))
                found.extend(subgraph_layers(body, here))
    return found
