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


def unique_name(base: str, taken: set, sep: str = "_") -> str:
    """``base``, or ``base_1``, ``base_2``, ... (``sep`` before the number) whichever is not in
    ``taken``; records it."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}{sep}{k}", k + 1
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

    def producer_node(self, tensor: str) -> onnx.NodeProto | None:
        """The node writing ``tensor``; None for graph inputs, initializers and unknown names."""
        i = self.producer.get(tensor)
        return None if i is None else self.graph.node[i]

    def reader_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.graph.node[i] for i in self.readers(tensor)]

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


def remove_unused_constants(graph: onnx.GraphProto, *, listed_inputs: bool = False) -> int:
    """Drop what nothing reads any more: nodes that compute constants alone (Constant, and ops
    whose inputs are all constants), initializers, and the value_info of tensors gone; reads
    from inside If/Loop/Scan bodies count. Graph outputs stay; initializers also listed as
    graph inputs stay unless ``listed_inputs`` (then they go, with their input entry).
    Returns how many nodes and initializers were removed."""
    removed = 0
    while True:
        used = _reads(graph)
        consts = {t.name for t in graph.initializer}
        for node in graph.node:  # topological: ops of constants alone compute constants
            if is_onnx(node) and (node.op_type == "Constant" or (
                    node.input and all(n in consts for n in node.input if n))):
                consts.update(node.output)
        dead = [i for i, node in enumerate(graph.node)
                if all(o in consts and o not in used for o in node.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
        removed += len(dead)
    used = _reads(graph)
    inputs = {v.name for v in graph.input}
    keep = [t for t in graph.initializer
            if t.name in used or (t.name in inputs and not listed_inputs)]
    if len(keep) != len(graph.initializer):
        gone = {t.name for t in graph.initializer} - {t.name for t in keep}
        removed += len(gone)
        del graph.initializer[:]
        graph.initializer.extend(keep)
        if listed_inputs:
            kept_inputs = [v for v in graph.input if v.name not in gone]
            del graph.input[:]
            graph.input.extend(kept_inputs)
    produced = ({o for node in graph.node for o in node.output} | {v.name for v in graph.input}
                | {t.name for t in keep})
    info = [v for v in graph.value_info if v.name in produced]
    if len(info) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(info)
    return removed


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Tensors read by a node (at any depth of subgraphs) or listed as graph outputs."""
    return {n for node in graph.node for n in node.input} | {o.name for o in graph.output} | (
        subgraph_reads(graph))


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read from inside If/Loop/Scan bodies (outer-scope references included)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= {name for n in g.node for name in n.input} | subgraph_reads(g)
    return names
