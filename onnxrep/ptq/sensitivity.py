"""Per-layer quantization error: which nodes lose signal in INT8, and whether their weights or
their activations are to blame.

For every node that onnxruntime quantized, three local copies run on the FP32 model's own input
to that node, so error from the layers above does not accumulate:
W+A (quantized weights and quantized input/output activations, with the QDQ model's own Q/DQ
parameters), W (quantized weights, float activations) and A (float weights, quantized
activations). Each is compared to the FP32 node output, taken after a ReLU/Clip that onnxruntime
folded into the output quantization:

    SQNR = 10 log10(sum y^2 / sum (y - y_q)^2)     over every element of the analysis batches.

The cumulative column compares the QDQ model's own tensor at that node to FP32 (error of all the
layers above included), as onnxruntime's qdq_loss_debug does. One onnxruntime session holds the
FP32 graph, the QDQ graph (tensors renamed) and the local copies; only scalar sums of squares
leave it, so memory does not grow with the number of nodes. Nodes are matched between the two
graphs by name (``prepare`` made names unique), tensors through explicit producer/consumer maps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxrep import verify
from onnxrep.errors import InputError
from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.passes.base import Skip
from onnxrep.analysis.qdq import quantized_nodes
from onnxrep.report import fmt, table

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FOLDED_ACTIVATIONS = ("Relu", "Clip")
VARIANTS = ("wa", "w", "a")
_Q = "q::"  # prefix of the QDQ graph's tensors inside the combined graph


@dataclass(frozen=True)
class LayerError:
    """SQNR in dB; None where a part does not apply (no quantized weight, or no quantized
    activation around the node)."""

    node: str
    op: str
    sqnr_db: float
    weight_sqnr_db: float | None
    activation_sqnr_db: float | None
    cumulative_sqnr_db: float

    @property
    def cause(self) -> str:
        w, a = self.weight_sqnr_db, self.activation_sqnr_db
        if w is None or a is None:
            return "weights" if a is None and w is not None else "activations"
        return "weights" if w < a else "activations"

    def as_dict(self) -> dict:
        return {**asdict(self), "cause": self.cause}


@dataclass
class LayerReport:
    layers: list[LayerError]  # worst (lowest local SQNR) first
    samples: int
    skips: list[Skip] = field(default_factory=list)

    def table(self, limit: int | None = None) -> str:
        rows = [[e.node, e.op, _db(e.sqnr_db), _db(e.weight_sqnr_db), _db(e.activation_sqnr_db),
                 _db(e.cumulative_sqnr_db), e.cause] for e in self.layers[:limit]]
        return table(["node", "op", "SQNR dB", "weights only", "activations only",
                      "cumulative", "cause"], rows, "llrrrrl")

    def as_dict(self) -> dict:
        return {"samples": self.samples, "layers": [e.as_dict() for e in self.layers],
                "skipped": [vars(s) for s in self.skips]}


def _db(v: float | None) -> str:
    return "-" if v is None else (fmt(v, 3) if not math.isfinite(v) else f"{v:.1f}")


def summed_outputs(model: onnx.ModelProto, batches: list[dict]) -> tuple[dict[str, float], int]:
    """({output: its sum over ``batches``}, samples) of a model whose outputs are scalars (the
    reductions a probe graph adds), in one session."""
    sess = verify.session(model)
    names = [o.name for o in sess.get_outputs()]
    sums = dict.fromkeys(names, 0.0)
    samples = 0
    for feeds in batches:
        for name, value in zip(names, sess.run(names, feeds)):
            sums[name] += float(value)
        samples += len(next(iter(feeds.values())))
    return sums, samples


def layer_report(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto,
                 batches: list[dict]) -> LayerReport:
    """Per-node SQNR of ``qdq_model`` against ``float_model`` (the FP32 model it was quantized
    from, node names unchanged) on ``batches``; neither model is mutated."""
    graph = _Combined(float_model, qdq_model)
    sums, samples = summed_outputs(graph.model, batches)
    layers = [probe.result(sums) for probe in graph.probes]
    layers.sort(key=lambda e: (e.sqnr_db, e.node))
    return LayerReport(layers, samples, graph.skips)


@dataclass
class _Probe:
    node: str
    op: str
    signal: str
    noise: dict  # variant or "cumulative" -> output name of the summed squared error
    has_weight: bool
    has_activation: bool

    def result(self, sums: dict) -> LayerError:
        def sqnr(key):
            s, n = sums[self.signal], sums[self.noise[key]]
            if n <= 0:
                return math.inf
            return 10 * math.log10(s / n) if s > 0 else -math.inf

        return LayerError(self.node, self.op, sqnr("wa"),
                          sqnr("w") if self.has_weight else None,
                          sqnr("a") if self.has_activation else None, sqnr("cumulative"))


class _Combined:
    """FP32 graph + renamed QDQ graph + local copies of each quantized node + squared-error
    sums, as one model whose outputs are scalars."""

    def __init__(self, float_model: onnx.ModelProto, qdq_model: onnx.ModelProto):
        self.f, self.q = GraphIndex(float_model.graph), GraphIndex(qdq_model.graph)
        self.f_tensors = (set(self.f.producer) | set(self.f.initializers)
                          | self.f.graph_inputs)
        self.f_by_name = {n.name: i for i, n in enumerate(float_model.graph.node)}
        self.q_names = {n.name for n in qdq_model.graph.node}
        self.nodes: list[onnx.NodeProto] = []
        self.outputs: list[str] = []
        self.probes: list[_Probe] = []
        self.skips: list[Skip] = []
        self._signals: dict[str, str] = {}
        self._n = 0
        renamed = _renamed_graph(qdq_model.graph)
        for name in quantized_nodes(qdq_model):
            i = next(k for k, n in enumerate(qdq_model.graph.node) if n.name == name)
            reason = "no FP32 node of that name" if name not in self.f_by_name else self._probe(i)
            if reason:
                self.skips.append(Skip(name, reason))
        model = onnx.ModelProto()
        model.CopyFrom(float_model)
        g = model.graph
        g.node.extend(renamed.node)
        g.initializer.extend(renamed.initializer)
        g.node.extend(self.nodes)
        del g.output[:]
        g.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, [])
                        for o in self.outputs)
        del model.opset_import[:]
        model.opset_import.extend(qdq_model.opset_import)
        self.model = model

    # -- QDQ graph structure --
    def _dq(self, tensor: str) -> onnx.NodeProto | None:
        i = self.q.producer.get(tensor)
        node = self.q.node(i) if i is not None else None
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def _quantized_input(self, tensor: str):
        """("weight", None) for DQ(constant), ("activation", Q node) for DQ(Q(x)), else None."""
        dq = self._dq(tensor)
        if dq is None:
            return None
        if self.q.is_const(dq.input[0]):
            return "weight", None
        i = self.q.producer.get(dq.input[0])
        if i is not None and self.q.node(i).op_type == "QuantizeLinear":
            return "activation", self.q.node(i)
        return None

    def _output_qdq(self, tensor: str) -> tuple | None:
        """(Q node, DQ node) quantizing ``tensor`` in the QDQ graph, if any."""
        for i in self.q.readers(tensor):
            qn = self.q.node(i)
            if qn.op_type != "QuantizeLinear":
                continue
            for j in self.q.readers(qn.output[0]):
                if self.q.node(j).op_type == "DequantizeLinear":
                    return qn, self.q.node(j)
        return None

    def _folded_activation(self, f_node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The float ReLU/Clip after ``f_node`` that the QDQ graph no longer has."""
        readers = self.f.readers(f_node.output[0])
        if len(readers) != 1 or f_node.output[0] in self.f.graph_outputs:
            return None
        act = self.f.node(readers[0])
        if act.op_type in FOLDED_ACTIVATIONS and act.name not in self.q_names:
            return act
        return None

    # -- building --
    def _name(self, kind: str) -> str:
        self._n += 1
        return f"sens::{kind}{self._n}"

    def _probe(self, qi: int) -> str | None:
        qn = self.q.node(qi)
        fn = self.f.node(self.f_by_name[qn.name])
        if fn.op_type != qn.op_type or len(fn.input) != len(qn.input):
            return "the QDQ node differs from the float node of the same name"
        act = self._folded_activation(fn)
        reference = act.output[0] if act is not None else fn.output[0]
        out_qdq = self._output_qdq(qn.output[0])
        kinds = [self._quantized_input(x) if x else None for x in qn.input]
        has_weight = any(k and k[0] == "weight" for k in kinds)
        has_activation = out_qdq is not None or any(k and k[0] == "activation" for k in kinds)
        for slot, (x, k) in enumerate(zip(qn.input, kinds)):
            if x and k is None and x not in self.f_tensors:
                return f"input '{x}' has no FP32 counterpart"
            if k and k[0] == "activation" and k[1].input[0] not in self.f_tensors:
                return f"quantized input '{k[1].input[0]}' has no FP32 counterpart"
            if k and k[0] == "weight" and slot == 1:
                self._check_weight(qn.name, fn.input[1], self._dq(x))
        noise = {}
        for variant in VARIANTS:
            result = self._local_copy(qn, fn, variant, kinds, out_qdq, act)
            noise[variant] = self._squared_error(reference, result)
        if out_qdq is not None:
            cumulative = _Q + out_qdq[1].output[0]
        else:
            cumulative = _Q + qn.output[0]
        noise["cumulative"] = self._squared_error(reference, cumulative)
        self.probes.append(_Probe(qn.name, qn.op_type, self._signal(reference), noise,
                                  has_weight, has_activation))
        return None

    def _check_weight(self, node: str, float_weight: str, dq: onnx.NodeProto) -> None:
        """The float model must be the one the QDQ model was quantized from: its weight within
        one quantization step of the dequantized weight (CLE, for one, rescales channels)."""
        w = self.f.const(float_weight)
        q, scale = self.q.const(dq.input[0]), self.q.const(dq.input[1])
        zero = self.q.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if w is None or q is None or scale is None or w.shape != q.shape:
            raise InputError(f"node '{node}': the FP32 weight does not match the QDQ model's")
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[int(attr(dq, "axis", 1))] = scale.size
        scale = scale.astype(np.float64).reshape(shape)
        zero = 0 if zero is None else zero.astype(np.float64).reshape(shape)
        error = np.abs(w.astype(np.float64) - (q.astype(np.float64) - zero) * scale)
        if np.any(error > scale * 0.51 + 1e-6 * np.abs(w)):
            raise InputError(
                f"node '{node}': the FP32 model is not the one this QDQ model was quantized "
                "from (weights differ by more than one quantization step); use the FP32 model "
                "quantize returned as its float model (`onnxrep quantize --save-float`)")

    def _local_copy(self, qn, fn, variant, kinds, out_qdq, act) -> str:
        inputs = []
        for slot, (x, k) in enumerate(zip(qn.input, kinds)):
            if not x or k is None:
                inputs.append(x)
            elif k[0] == "weight":
                inputs.append(fn.input[slot] if variant == "a" else _Q + x)
            else:
                source = k[1].input[0]
                inputs.append(source if variant == "w" else
                              self._qdq(source, k[1], self._dq(x)))
        copy = onnx.NodeProto()
        copy.CopyFrom(qn)
        copy.name = self._name(f"{variant}:{qn.name}:")
        del copy.input[:]
        copy.input.extend(inputs)
        outs = [self._name("y") if o else "" for o in qn.output]
        del copy.output[:]
        copy.output.extend(outs)
        self.nodes.append(copy)
        y = outs[0]
        if out_qdq is not None and variant != "w":
            return self._qdq(y, *out_qdq)
        if act is not None:
            a = onnx.NodeProto()
            a.CopyFrom(act)
            a.name = self._name("act")
            a.input[0] = y
            a.output[0] = self._name("y")
            self.nodes.append(a)
            return a.output[0]
        return y

    def _qdq(self, tensor: str, q: onnx.NodeProto, dq: onnx.NodeProto) -> str:
        """Copies of ``q`` and ``dq`` (same parameters) applied to a float tensor."""
        nq, ndq = onnx.NodeProto(), onnx.NodeProto()
        nq.CopyFrom(q)
        ndq.CopyFrom(dq)
        nq.name, ndq.name = self._name("q"), self._name("dq")
        nq.input[0] = tensor
        for node in (nq, ndq):
            for k in range(1, len(node.input)):
                if node.input[k]:
                    node.input[k] = _Q + node.input[k]
        nq.output[0] = ndq.input[0] = self._name("int")
        ndq.output[0] = self._name("x")
        self.nodes.extend([nq, ndq])
        return ndq.output[0]

    def _signal(self, reference: str) -> str:
        if reference not in self._signals:
            out = self._name("signal")
            self.nodes.append(helper.make_node("ReduceSumSquare", [reference], [out],
                                               name=out, keepdims=0))
            self.outputs.append(out)
            self._signals[reference] = out
        return self._signals[reference]

    def _squared_error(self, reference: str, candidate: str) -> str:
        diff, out = self._name("diff"), self._name("noise")
        self.nodes.append(helper.make_node("Sub", [reference, candidate], [diff], name=diff))
        self.nodes.append(helper.make_node("ReduceSumSquare", [diff], [out], name=out,
                                           keepdims=0))
        self.outputs.append(out)
        return out


def _renamed_graph(graph: onnx.GraphProto) -> onnx.GraphProto:
    """A copy of ``graph``'s nodes and initializers with every tensor and node name prefixed,
    except the graph inputs (shared with the FP32 graph)."""
    keep = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    out = onnx.GraphProto()
    out.initializer.extend(graph.initializer)
    for t in out.initializer:
        t.name = _Q + t.name
    for node in graph.node:
        n = out.node.add()
        n.CopyFrom(node)
        n.name = _Q + node.name
        for k, x in enumerate(n.input):
            if x and x not in keep:
                n.input[k] = _Q + x
        for k, x in enumerate(n.output):
            if x:
                n.output[k] = _Q + x
    return out

