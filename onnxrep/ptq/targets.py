"""Deployment targets: how to quantize for the runtime that will run the model.

A :class:`Target` is a frozen record of what ``onnxruntime.quantization.quantize_static``
needs for one runtime (activation and weight types, symmetry, per-channel default, op types,
``extra_options`` under onnxruntime 1.32's own key names) plus the nodes to keep in float and
an optional post-processing function over the QDQ ``ModelProto``. ``TARGETS`` holds three:

``onnxruntime``
    onnxrep's QDQ as before: uint8 asymmetric activations, int8 symmetric weights,
    per-tensor by default, the Conv/Gemm/MatMul layers and the ops around them; onnxruntime
    folds a ReLU into the preceding layer's output quantization and fuses DQ -> Conv -> Q into
    QLinearConv with an int32 bias.

``openvino``
    What OpenVINO's CPU plugin turns into int8 kernels: onnxruntime's QDQ layout and types
    (uint8 activations, int8 symmetric weights, outputs quantized with the ReLU folded in,
    int32 bias), which it reads as FakeQuantize and runs as int8 convolutions, depthwise
    ones included; per-channel weights by default (no slower there, and more accurate).
    Measured with OpenVINO 2026.4 on the shipped models (``tools/bench_targets.py``): Q/DQ on
    op inputs only, as NNCF writes ONNX, and the TensorRT layout were no faster; leaving
    the depthwise convolutions in float (``float_depthwise``) made MobileOne slower (its
    float depthwise kernels are no faster than the int8 ones and need reorders around them).

``tensorrt``
    TensorRT explicit quantization as NVIDIA ModelOpt places it (``modelopt.onnx.quantization``:
    its ``trt_guided_options`` and post-processing): int8 symmetric activations and weights
    (every zero point 0), per-channel weights on axis 0 (ConvTranspose axis 1), float biases
    (no int32 bias DequantizeLinear), Q/DQ only on the inputs of quantized ops (no op output is
    quantized, so nothing sits between a Conv and its BatchNormalization or ReLU), and then
    :func:`tensorrt_postprocess`: a residual Add keeps Q/DQ on its skip input only (the
    Conv's branch is fed unquantized so TensorRT fuses Conv+Add(+ReLU)), and the quantized
    inputs of a Concat and its output quantizer share one scale (TensorRT then drops the
    concatenation's re-quantization). Which nodes get Q/DQ follows ModelOpt's partitioning
    (:func:`tensorrt_float_nodes`): an Add that is not residual (a bias, the ``x + 3`` of a
    written-out HardSwish, the Add closing a squeeze-excite gate) and a pooling op reading a
    layer's output stay float, because TensorRT fuses them into the layer before them (or
    runs them on its float output); a layer output read through Q/DQ by anything but the next
    layer's activation input or a residual Add's skip input reads the float tensor instead.
    Weights are int8 initializers with a DequantizeLinear
    (ModelOpt's ``AddQDQPairToWeight`` keeps float weights behind a Q/DQ pair instead; TensorRT
    accepts both). :func:`check_tensorrt_rules` lists every departure from these rules.

``QuantizeConfig(target=...)`` selects one: ``target.quantize_static_kwargs(per_channel)`` are
the keyword arguments for ``quantize_static`` (besides model paths, calibration cache and
``nodes_to_exclude``), ``target.keep_float(model)`` the node names it adds to
``nodes_to_exclude``, ``target.finish(qdq)`` the post-processing of its output and
``target.violations(qdq)`` the rules the result breaks. ``QATConfig(target=...)`` trains for
the same object: QAT reads ``activation_qrange()``, ``activation_symmetric``,
``quantize_bias``, ``quantizes_outputs`` and, for a target that quantizes op inputs,
``input_layout(model)`` (the tensors ``quantize_static`` plus ``finish`` would put Q/DQ on),
then applies ``finish`` and ``violations`` to its export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import onnx

from onnxrep.errors import InputError
from onnxrep.ir.graph import GraphIndex, attr

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class Target:
    """One runtime's quantization settings (see the module docstring)."""

    name: str
    description: str
    activation_type: str = "uint8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    per_channel: bool = False  # the default when the user does not say
    op_types: tuple[str, ...] = ()
    extra_options: Mapping[str, object] = field(default_factory=dict)
    float_depthwise: bool = False  # keep depthwise Conv in float
    float_nodes: Callable[[onnx.ModelProto], list[str]] | None = None  # placement's float nodes
    postprocess: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    check: Callable[[onnx.ModelProto], list[str]] | None = None

    def __post_init__(self):
        if self.activation_type not in TYPES or self.weight_type not in TYPES:
            raise ValueError(f"{self.name}: types must be uint8 or int8")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        # frozen all the way down: the options are read-only; quantize_static gets a copy
        object.__setattr__(self, "extra_options", MappingProxyType(dict(self.extra_options)))

    def options(self) -> dict:
        """``extra_options`` for ``quantize_static`` (a fresh deep-enough copy), with the
        symmetry flags under onnxruntime's names."""
        opts = {k: (list(v) if isinstance(v, (list, tuple)) else
                    dict(v) if isinstance(v, Mapping) else v)
                for k, v in self.extra_options.items()}
        opts["ActivationSymmetric"] = self.activation_symmetric
        opts["WeightSymmetric"] = self.weight_symmetric
        return opts

    def quantize_static_kwargs(self, per_channel: bool | None = None) -> dict:
        """Keyword arguments for ``onnxruntime.quantization.quantize_static``: quant_format,
        op_types_to_quantize, per_channel, activation_type, weight_type, extra_options."""
        from onnxruntime.quantization import QuantFormat, QuantType

        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        return {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": list(self.op_types),
                "per_channel": self.per_channel if per_channel is None else per_channel,
                "activation_type": types[self.activation_type],
                "weight_type": types[self.weight_type], "extra_options": self.options()}

    @property
    def quantize_bias(self) -> bool:
        """Biases as int32 DequantizeLinear on the grid s_x s_w (False: left in float)."""
        return bool(self.extra_options.get("QuantizeBias", True))

    @property
    def quantizes_outputs(self) -> bool:
        """onnxruntime's layout (layer outputs quantized, a ReLU folded in) rather than Q/DQ on
        op inputs only (``OpTypesToExcludeOutputQuantization`` set, TensorRT's layout)."""
        return not self.extra_options.get("OpTypesToExcludeOutputQuantization")

    def activation_qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the activation codes as onnxruntime picks them: uint8 0..255,
        int8 -128..127, symmetric int8 -127..127 (so that zero point 0 is centred)."""
        if self.activation_type == "uint8":
            return 0, 255
        return (-127, 127) if self.activation_symmetric else (-128, 127)

    def input_layout(self, model: onnx.ModelProto) -> tuple[list[str], list[list[str]]]:
        """Where a Q/DQ-on-inputs target quantizes activations, for QAT to train what
        ``quantize`` would write: the computed inputs of every node of ``op_types`` (one Q/DQ
        per tensor, however many read it), except the conv-branch input of a residual Add
        that no other quantized node reads (TensorRT fuses Conv+Add on the float branch), and
        the nodes of :meth:`keep_float`; and the groups of those tensors that share one scale
        (a Concat's quantized inputs with its quantized output). Raises ValueError for an
        output-quantizing target."""
        if self.quantizes_outputs:
            raise ValueError(f"target {self.name} quantizes op outputs, not op inputs")
        g = GraphIndex(model.graph)
        conv_branch = {(add.name, add.input[k]) for add, k in residual_adds(model)}
        floats = set(self.keep_float(model))
        tensors: list[str] = []
        for node in model.graph.node:
            if node.op_type not in self.op_types or node.name in floats:
                continue
            for x in node.input:
                if x and not g.is_const(x) and (node.name, x) not in conv_branch \
                        and x not in tensors:
                    tensors.append(x)
        chosen = set(tensors)
        groups = []
        for node in model.graph.node:
            if node.op_type == "Concat":
                members = [x for x in (*node.input, *node.output) if x in chosen]
                if len(members) > 1:
                    groups.append(members)
        return tensors, groups

    def keep_float(self, model: onnx.ModelProto) -> list[str]:
        """Names of the nodes this target leaves in float (for ``nodes_to_exclude``): the
        depthwise convolutions with ``float_depthwise``, and ``float_nodes(model)``, the nodes
        of ``op_types`` its placement does not quantize."""
        names = depthwise_convs(model) if self.float_depthwise else []
        return names + (self.float_nodes(model) if self.float_nodes is not None else [])

    def finish(self, qdq: onnx.ModelProto) -> onnx.ModelProto:
        """The target's post-processing of ``quantize_static``'s output (in place; returned)."""
        return self.postprocess(qdq) if self.postprocess is not None else qdq

    def violations(self, qdq: onnx.ModelProto, per_channel: bool = True) -> list[str]:
        """The rules ``qdq`` breaks; ``per_channel`` False accepts per-tensor weight scales
        (the user asked for them)."""
        return self.check(qdq, per_channel=per_channel) if self.check is not None else []

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "activation_type": self.activation_type, "weight_type": self.weight_type,
                "activation_symmetric": self.activation_symmetric,
                "weight_symmetric": self.weight_symmetric, "per_channel": self.per_channel,
                "op_types": list(self.op_types), "extra_options": self.options(),
                "float_depthwise": self.float_depthwise,
                "float_nodes": getattr(self.float_nodes, "__name__", None),
                "postprocess": getattr(self.postprocess, "__name__", None)}


# ---- graph helpers ----------------------------------------------------------------------------

def dq_source(g: GraphIndex, tensor: str
              ) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
    """(DequantizeLinear, its QuantizeLinear or None) when ``tensor`` is a DQ output."""
    dq = g.producer_node(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = g.producer_node(dq.input[0])
    return dq, (q if q is not None and q.op_type == "QuantizeLinear" else None)


def through_qdq(g: GraphIndex, tensor: str) -> str:
    """The float tensor behind a Q -> DQ pair, else ``tensor`` itself."""
    pair = dq_source(g, tensor)
    return pair[1].input[0] if pair is not None and pair[1] is not None else tensor


def _op(g: GraphIndex, tensor: str) -> str | None:
    node = g.producer_node(tensor)
    return node.op_type if node is not None else None


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes with group > 1 and one input channel per group (depthwise,
    any depth multiplier) whose weight is a constant."""
    g = GraphIndex(model.graph)
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or int(attr(node, "group", 1)) <= 1 or len(node.input) < 2:
            continue
        w = g.const(node.input[1])
        if w is not None and w.ndim >= 3 and w.shape[1] == 1:
            names.append(node.name)
    return names


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads, then unused initializers."""
    graph = model.graph
    while True:
        g = GraphIndex(graph)
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(g.readers(o) or o in g.graph_outputs for o in n.output)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(keep)
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


# ---- TensorRT: residual Add and Concat ---------------------------------------------------------

_BACKBONE_OPS = ("Conv", "ConvTranspose")
_PASS_THROUGH = ("BatchNormalization",)  # Conv -> BN -> Add still fuses


def _backbone(g: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The Conv whose output (through Q/DQ and BatchNormalization) is ``tensor``."""
    seen = 0
    name = through_qdq(g, tensor)
    while seen < 8:
        node = g.producer_node(name)
        if node is None:
            return None
        if node.op_type in _BACKBONE_OPS:
            return node
        if node.op_type not in _PASS_THROUGH:
            return None
        name = through_qdq(g, node.input[0])
        seen += 1
    return None


def _ancestor_depths(g: GraphIndex, tensor: str, limit: int = 10000) -> dict[str, int]:
    """Producer node name -> shortest distance (in nodes, Q/DQ not counted) from ``tensor``."""
    depths: dict[str, int] = {}
    frontier = [(through_qdq(g, tensor), 1)]
    while frontier and len(depths) < limit:
        nxt = []
        for name, d in frontier:
            node = g.producer_node(name)
            if node is None or node.name in depths:
                continue
            depths[node.name] = d
            for x in node.input:
                if x and not g.is_const(x):
                    nxt.append((through_qdq(g, x), d + 1))
        frontier = nxt
    return depths


def residual_adds(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int]]:
    """(Add node, index of its non-residual input) for each residual Add, by ModelOpt's rule:
    both inputs computed (not constant, not graph inputs), at least one produced by a Conv
    (through BatchNormalization); the conv-branch input is the one with the longer path to the
    two inputs' lowest common ancestor; an Add whose other input branches off the Conv's own
    output is not residual."""
    g = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        if g.is_const(a) or g.is_const(b) or through_qdq(g, a) not in g.producer \
                or through_qdq(g, b) not in g.producer:
            continue
        bb = [_backbone(g, a), _backbone(g, b)]
        if not any(bb):
            continue
        da, db = _ancestor_depths(g, a), _ancestor_depths(g, b)
        common = set(da) & set(db)
        lca = min(common, key=lambda n: da[n] + db[n]) if common else None
        if bb[0] is not None and bb[1] is not None:
            if bb[0].name == bb[1].name:
                continue
            d0 = da.get(lca, 10**9) if lca else 0
            d1 = db.get(lca, 10**9) if lca else 0
            found.append((node, 0 if d0 > d1 else 1))
        else:
            k = 0 if bb[0] is not None else 1
            if lca is not None and lca == bb[k].name:  # Conv -> (branch) -> Add: not residual
                continue
            found.append((node, k))
    return found


def _residual_skips(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(Add name, skip-input tensor) of every residual Add."""
    return {(add.name, add.input[1 - k]) for add, k in residual_adds(model)}


def _reads_int8(node: onnx.NodeProto, index: int, skips: set[tuple[str, str]]) -> bool:
    """Whether TensorRT reads input ``index`` of ``node`` in int8 when a layer produces it: the
    activation input of a Conv/ConvTranspose/Gemm/MatMul (either input of a MatMul), or the
    skip input of a residual Add. Any other reader of a layer output is fused into that layer
    (BN, activation, bias or HardSwish arithmetic) or runs on its float output."""
    if node.op_type in WEIGHT_OPS:
        return index == 0 or node.op_type == "MatMul"
    return (node.name, node.input[index]) in skips


_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")


def tensorrt_float_nodes(model: onnx.ModelProto) -> list[str]:
    """The Add and pooling nodes TensorRT's placement leaves in float, after ModelOpt's
    partitioning (``modelopt/onnx/quantization/partitioning.py``): it grows a partition from
    each Conv/Gemm/MatMul over the pointwise ops whose other inputs are constants or the
    partition's own tensors (BN, Relu, a bias Add, a HardSwish written as
    ``x * clip(x + 3, 0, 6) / 6``), which TensorRT fuses into the layer, and quantizes only
    what enters a partition from outside. Hence:

    - an Add is quantized only when it is residual (:func:`residual_adds`), its skip input
      entering the Conv's partition; every other Add is a layer's epilogue or elementwise
      arithmetic on float tensors (``x + 3`` of a HardSwish, the Add closing a squeeze-excite
      gate, whose inputs branch off one Conv);
    - a pooling op reading a layer's output directly stays float: quantizing its input would
      quantize the layer's output for a reader other than the next layer, so TensorRT runs the
      pooling on the float output and the next layer's input carries the Q/DQ."""
    g = GraphIndex(model.graph)
    residual = {add.name for add, _ in residual_adds(model)}
    names = []
    for node in model.graph.node:
        if node.op_type == "Add" and node.name not in residual:
            names.append(node.name)
        elif node.op_type in _POOLS and node.input and _op(g, node.input[0]) in WEIGHT_OPS:
            names.append(node.name)
    return names


def _float_readers_of_layer_outputs(model: onnx.ModelProto) -> None:
    """Readers of a layer's Q/DQ'd output that TensorRT does not read in int8
    (:func:`_reads_int8`) read the float output instead (in place), as ModelOpt's
    ``remove_partial_input_qdq`` does: onnxruntime gives all readers of a tensor one Q/DQ,
    so a Conv feeding both another Conv and the float ``x + 3`` of a HardSwish would hand
    the quantized ``x`` to the HardSwish and split the Conv from its activation."""
    g = GraphIndex(model.graph)
    skips = _residual_skips(model)
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for q in g.reader_nodes(node.output[0]):
            if q.op_type != "QuantizeLinear":
                continue
            for dq in g.reader_nodes(q.output[0]):
                for reader in g.reader_nodes(dq.output[0]):
                    for i, x in enumerate(reader.input):
                        if x == dq.output[0] and not _reads_int8(reader, i, skips):
                            reader.input[i] = node.output[0]


def _set_scale(g: GraphIndex, node: onnx.NodeProto, value: float) -> None:
    """Every entry of a Q/DQ node's constant scale set to ``value`` (in place)."""
    scale = g.const(node.input[1])
    if scale is not None:
        g.set_const(node.input[1], np.full_like(scale, value))


def _scale(g: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    return g.const(node.input[1]) if len(node.input) > 1 else None


def concat_groups(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """(Concat, its Q/DQ nodes): the DequantizeLinear nodes feeding it, their QuantizeLinear
    nodes, and the QuantizeLinear nodes reading its output (with their DQs)."""
    g = GraphIndex(model.graph)
    groups = []
    for node in model.graph.node:
        if node.op_type != "Concat":
            continue
        members: list[onnx.NodeProto] = []
        for x in node.input:
            pair = dq_source(g, x)
            if pair is not None and not g.is_const(pair[0].input[0]):
                members += [n for n in pair if n is not None]
        for reader in g.reader_nodes(node.output[0]):
            if reader.op_type == "QuantizeLinear":
                members.append(reader)
                members += [r for r in g.reader_nodes(reader.output[0])
                            if r.op_type == "DequantizeLinear"]
        if sum(m.op_type == "DequantizeLinear" for m in members) + \
                sum(m.op_type == "QuantizeLinear" for m in members) >= 2:
            groups.append((node, members))
    return groups


def tensorrt_postprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """ModelOpt's post-processing of onnxruntime's QDQ output (in place; returned):

    1. residual Add: the conv branch's input bypasses its Q/DQ (reads the float tensor), the
       skip input keeps its Q/DQ, so TensorRT fuses Conv+Add(+ReLU) with an int8 skip;
    2. Concat: its quantized inputs and the quantizer of its output share one scale, the
       largest of theirs (symmetric int8: the union of their ranges);
    3. a layer output's Q/DQ feeds only the readers TensorRT reads in int8 (the next layer,
       a residual skip); the others read the float output
       (:func:`_float_readers_of_layer_outputs`);
    4. Q/DQ nodes left unread and unused initializers are dropped."""
    graph = model.graph
    for add, k in residual_adds(model):
        g = GraphIndex(graph)
        pair = dq_source(g, add.input[k])
        if pair is not None and pair[1] is not None:
            add.input[k] = pair[1].input[0]
    g = GraphIndex(graph)
    for _, members in concat_groups(model):
        scales = [_scale(g, m) for m in members]
        if any(s is None or np.size(s) != 1 for s in scales):
            continue  # per-channel activation scales: left alone
        shared = float(max(float(np.max(s)) for s in scales))
        for m in members:
            _set_scale(g, m, shared)
    _float_readers_of_layer_outputs(model)
    _drop_dead(model)
    return model


# ---- TensorRT: the rules, checked --------------------------------------------------------------

def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return -1  # MatMul: the output axis of B [K, N]


def _layer_output_problems(g: GraphIndex, layer: onnx.NodeProto,
                           skips: set[tuple[str, str]]) -> list[str]:
    """``input-placement`` problems of a layer's quantized output: each reader of its Q/DQ
    that TensorRT does not read in int8, and a Q/DQ'd graph output."""
    problems = []
    for q in g.reader_nodes(layer.output[0]):
        if q.op_type != "QuantizeLinear":
            continue
        for dq in g.reader_nodes(q.output[0]):
            if dq.output[0] in g.graph_outputs:
                problems.append(f"input-placement: {layer.name}: its output is quantized into "
                                "the graph output")
            for reader in g.reader_nodes(dq.output[0]):
                if any(x == dq.output[0] and not _reads_int8(reader, i, skips)
                       for i, x in enumerate(reader.input)):
                    problems.append(f"input-placement: {layer.name}: its output is quantized "
                                    f"into {reader.op_type} {reader.name} (Q/DQ belongs on "
                                    "the next layer's input or a residual skip only)")
    return problems


def check_tensorrt_rules(model: onnx.ModelProto, *, per_channel: bool = True) -> list[str]:
    """Every departure of a QDQ model from the TensorRT rules, one ``"rule: node: what"``
    string each (empty: compliant). Rules:

    - ``zero-point``: every QuantizeLinear/DequantizeLinear zero point is 0;
    - ``int8``: activations and weights are int8 (a QuantizeLinear without a zero point
      produces uint8);
    - ``per-channel``: (with ``per_channel``) the weight DQ of a Conv/ConvTranspose/Gemm/MatMul
      is per-channel on axis 0 (ConvTranspose 1, Gemm without transB and MatMul the last);
      without it a weight scale is one per tensor or per channel on that axis (TensorRT
      accepts both);
    - ``float-bias``: no bias is an int32 DequantizeLinear;
    - ``input-placement``: the output of a Conv/ConvTranspose/Gemm/MatMul goes through Q/DQ
      only into readers TensorRT reads in int8 (the next layer's activation input, the skip
      input of a residual Add), never into the ops fused into the layer (BN, activation,
      bias or HardSwish arithmetic) nor a graph output; and a layer with a quantized weight
      reads a quantized activation;
    - ``conv-bn-relu``: no Q/DQ between a Conv (or its BatchNormalization) and the
      BatchNormalization/Relu/Clip after it;
    - ``residual-add``: a residual Add reads its conv branch unquantized and its skip input
      through Q/DQ;
    - ``concat-scale``: a Concat's quantized inputs and its output's quantizer share one scale.
    """
    g = GraphIndex(model.graph)
    skips = _residual_skips(model)
    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and np.any(zp != 0):
            problems.append(f"zero-point: {node.name or node.output[0]}: zero point "
                            f"{np.unique(zp)[:3].tolist()} is not 0")
        if node.op_type == "QuantizeLinear":
            dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
            if dtype != np.int8:
                problems.append(f"int8: {node.name or node.output[0]}: quantizes to "
                                f"{dtype.name}, not int8")
        elif g.is_const(node.input[0]):
            w = g.const(node.input[0])
            if w.dtype not in (np.int8, np.int32):
                problems.append(f"int8: {node.name or node.output[0]}: weight stored as "
                                f"{w.dtype.name}, not int8")
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        wpair = dq_source(g, node.input[1])
        weight_quantized = wpair is not None
        if weight_quantized:
            dq = wpair[0]
            scale = _scale(g, dq)
            w = g.const(dq.input[0]) if wpair[1] is None else g.const(wpair[1].input[0])
            axis = _weight_axis(node)
            if w is not None and (per_channel or np.size(scale) != 1):
                axis = axis % w.ndim
                want = w.shape[axis] if node.op_type != "ConvTranspose" else w.shape[1]
                got = int(attr(dq, "axis", 1)) % w.ndim
                if scale is None or np.ndim(scale) != 1 or np.size(scale) != want or got != axis:
                    problems.append(f"per-channel: {node.name}: weight scale of shape "
                                    f"{list(np.shape(scale))} on axis {got}, expected {want} "
                                    f"scales on axis {axis}")
        if len(node.input) > 2 and node.input[2]:
            bpair = dq_source(g, node.input[2])
            if bpair is not None:
                problems.append(f"float-bias: {node.name}: bias is quantized (int32 "
                                "DequantizeLinear)")
        if weight_quantized and dq_source(g, node.input[0]) is None:
            problems.append(f"input-placement: {node.name}: quantized weight but its "
                            "activation input has no Q/DQ")
        problems += _layer_output_problems(g, node, skips)
    for node in model.graph.node:
        if node.op_type not in ("BatchNormalization", "Relu", "Clip") or not node.input:
            continue
        pair = dq_source(g, node.input[0])
        if pair is None or pair[1] is None:
            continue
        src = _op(g, pair[1].input[0])
        if src in ("Conv", "ConvTranspose", "BatchNormalization"):
            problems.append(f"conv-bn-relu: {node.name}: Q/DQ between the {src} before it "
                            f"and this {node.op_type}")
    for add, k in residual_adds(model):
        if dq_source(g, add.input[k]) is not None:
            problems.append(f"residual-add: {add.name}: the conv-branch input "
                            f"'{add.input[k]}' goes through Q/DQ (blocks Conv+Add fusion)")
        if dq_source(g, add.input[1 - k]) is None:
            problems.append(f"residual-add: {add.name}: the skip input '{add.input[1 - k]}' "
                            "has no Q/DQ")
    for concat, members in concat_groups(model):
        scales = [_scale(g, m) for m in members]
        values = {round(float(np.max(s)), 12) for s in scales if s is not None}
        if len(values) > 1:
            problems.append(f"concat-scale: {concat.name}: {len(values)} different scales "
                            f"on its quantized inputs/output ({min(values):.4g}.."
                            f"{max(values):.4g})")
    return problems


# ---- the targets --------------------------------------------------------------------------------

ORT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool",
                "AveragePool", "GlobalAveragePool", "Flatten", "Reshape")
TRT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool",
                "GlobalAveragePool")
# every op type: ModelOpt sets OpTypesToExcludeOutputQuantization to all op types in the model
_ALL_OPS = tuple(sorted({*ORT_OP_TYPES, *TRT_OP_TYPES, "Concat", "Mul", "Sigmoid", "Resize",
                         "Flatten", "Reshape", "Transpose", "BatchNormalization", "Relu",
                         "Clip", "Softmax", "Pad", "Split", "Slice"}))

ONNXRUNTIME = Target(
    "onnxruntime", "onnxruntime CPU: QDQ fused into QLinearConv/QGemm (uint8 activations, "
    "int8 weights)",
    activation_type="uint8", weight_type="int8", activation_symmetric=False,
    weight_symmetric=True, per_channel=False, op_types=ORT_OP_TYPES, extra_options={})

OPENVINO = Target(
    "openvino", "OpenVINO CPU: onnxruntime's QDQ layout (uint8 activations, int8 per-channel "
    "weights), depthwise convolutions in int8 too",
    activation_type="uint8", weight_type="int8", activation_symmetric=False,
    weight_symmetric=True, per_channel=True, op_types=ORT_OP_TYPES, extra_options={},
    float_depthwise=False)

TENSORRT = Target(
    "tensorrt", "TensorRT explicit quantization (ModelOpt placement): int8 symmetric, Q/DQ on "
    "op inputs, float bias, residual-Add and Concat rules",
    activation_type="int8", weight_type="int8", activation_symmetric=True,
    weight_symmetric=True, per_channel=True, op_types=TRT_OP_TYPES,
    extra_options={"QuantizeBias": False,
                   "OpTypesToExcludeOutputQuantization": list(_ALL_OPS),
                   "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
                   "DedicatedQDQPair": False,
                   "ForceQuantizeNoInputCheck": True},
    float_nodes=tensorrt_float_nodes, postprocess=tensorrt_postprocess,
    check=check_tensorrt_rules)

TARGETS: Mapping[str, Target] = MappingProxyType(
    {t.name: t for t in (ONNXRUNTIME, OPENVINO, TENSORRT)})


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target '{name}': expected one of "
                         f"{', '.join(TARGETS)}") from None
