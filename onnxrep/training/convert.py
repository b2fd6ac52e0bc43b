"""ONNX -> torch: an ``nn.Module`` that runs an ONNX graph node by node, for training.

``to_torch(model)`` returns a :class:`GraphModule`. Its ``forward`` walks the topologically
sorted node list with a dict {tensor name: tensor}; every node is one ``nn.Module`` in
``steps``. Conv, ConvTranspose, Gemm and MatMul with a constant weight are
:class:`WeightLayer` modules holding that weight (and bias) as ``nn.Parameter``;
BatchNormalization is a :class:`BatchNorm` holding scale/bias as parameters and mean/var as
buffers. Each remembers the ONNX names it came from (``onnx_names``), and
:func:`weights_to_onnx` writes the current values back into a copy of the model under those
names, in ONNX layout (initializers or ``Constant`` nodes alike). Every other constant is a
buffer. No torch.fx, no tracing: what runs is exactly the ONNX node list.

Layouts: Conv/ConvTranspose weights as in ONNX (and torch); a Gemm/MatMul weight is kept as a
torch ``Linear`` weight [out, in] (B for Gemm transB=1, B^T otherwise; W^T for MatMul), so the
output-channel axis is 0 for every layer except ConvTranspose (axis 1).

torch is imported here only; nothing else in onnxrep imports this module at import time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnxrep.errors import UnsupportedModelError
from onnxrep.ir.graph import GraphIndex, attr, node_label, is_onnx
from onnxrep.ir.model import opset_version

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


# ---- weight layers ------------------------------------------------------------------------------

class WeightLayer(nn.Module):
    """A layer with a constant weight: ``apply(x, weight, bias)`` is the op with given
    parameters (fake quantization calls it with transformed ones), ``forward`` uses its own.

    ``out_axis``: output-channel axis of ``weight``; ``onnx_names``: {"weight"/"bias": ONNX
    tensor name}; ``node_index``: the ONNX node it came from."""

    out_axis = 0

    def __init__(self, node_index: int, label: str, weight: np.ndarray, bias: np.ndarray | None,
                 names: dict[str, str]):
        super().__init__()
        self.node_index, self.label, self.onnx_names = node_index, label, dict(names)
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, np.float32)))
        self.bias = (nn.Parameter(torch.from_numpy(np.array(bias, np.float32)))
                     if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.weight, self.bias)

    def apply(self, x, weight, bias):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_onnx(self, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, np.ndarray]:
        """``{ONNX name: array in ONNX layout}`` for the given parameters."""
        out = {self.onnx_names["weight"]: _np(weight)}
        if bias is not None and "bias" in self.onnx_names:
            out[self.onnx_names["bias"]] = _np(bias)
        return out

    def onnx_weight_axis(self) -> int:
        """The output-channel axis of the weight in ONNX layout (per-channel quantization)."""
        return self.out_axis


class Conv(WeightLayer):
    """ONNX Conv (1-3 spatial dims); asymmetric or SAME pads become an explicit zero pad."""

    def __init__(self, node: onnx.NodeProto, index: int, label: str, weight, bias, names):
        super().__init__(index, label, weight, bias, names)
        dims = weight.ndim - 2
        self.fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
        if self.fn is None:
            raise UnsupportedModelError(f"{label}: Conv with {dims} spatial dims")
        self.kernel = tuple(weight.shape[2:])
        self.strides = tuple(attr(node, "strides", [1] * dims))
        self.dilations = tuple(attr(node, "dilations", [1] * dims))
        self.groups = int(attr(node, "group", 1))
        self.pads = _Pads(node, dims, self.kernel, self.strides, self.dilations, label)

    def apply(self, x, weight, bias):
        x, padding = self.pads(x)
        return self.fn(x, weight, bias, self.strides, padding, self.dilations, self.groups)


class ConvTranspose(WeightLayer):
    """ONNX ConvTranspose with explicit pads and output_padding (no output_shape/auto_pad).
    Weight [Cin, Cout/group, k...]; output channels on axis 1."""

    out_axis = 1

    def __init__(self, node: onnx.NodeProto, index: int, label: str, weight, bias, names):
        super().__init__(index, label, weight, bias, names)
        dims = weight.ndim - 2
        self.fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(dims)
        if self.fn is None:
            raise UnsupportedModelError(f"{label}: ConvTranspose with {dims} spatial dims")
        if attr(node, "output_shape") or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET",
                                                                                  "NOTSET"):
            raise UnsupportedModelError(f"{label}: ConvTranspose with output_shape or auto_pad "
                                        "is not supported; give explicit pads")
        self.strides = tuple(attr(node, "strides", [1] * dims))
        self.dilations = tuple(attr(node, "dilations", [1] * dims))
        self.output_padding = tuple(attr(node, "output_padding", [0] * dims))
        self.groups = int(attr(node, "group", 1))
        pads = list(attr(node, "pads", [0] * 2 * dims))
        self.begin, self.end = pads[:dims], pads[dims:]

    def apply(self, x, weight, bias):
        if self.begin == self.end:
            return self.fn(x, weight, bias, self.strides, tuple(self.begin),
                           self.output_padding, self.groups, self.dilations)
        y = self.fn(x, weight, bias, self.strides, 0, self.output_padding, self.groups,
                    self.dilations)
        crop = [slice(None), slice(None)] + [slice(b, y.shape[2 + i] - e) for i, (b, e) in
                                             enumerate(zip(self.begin, self.end))]
        return y[tuple(crop)]


class Linear(WeightLayer):
    """Gemm (alpha = beta = 1, transA = 0, bias of shape [out] or [1, out]) or MatMul with a
    constant 2-D right operand: y = x W^T + b with W kept as [out, in]."""

    def __init__(self, index: int, label: str, weight, bias, names, onnx_transposed: bool,
                 bias_shape: tuple | None):
        super().__init__(index, label, weight, bias, names)
        self.onnx_transposed, self.bias_shape = onnx_transposed, bias_shape

    def apply(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def to_onnx(self, weight, bias):
        w = _np(weight)
        out = {self.onnx_names["weight"]: w.T.copy() if self.onnx_transposed else w}
        if bias is not None and "bias" in self.onnx_names:
            out[self.onnx_names["bias"]] = _np(bias).reshape(self.bias_shape)
        return out

    def onnx_weight_axis(self) -> int:
        return 1 if self.onnx_transposed else 0


class BatchNorm(nn.Module):
    """ONNX BatchNormalization (inference form): y = (x - mean) / sqrt(var + eps) * s + b."""

    def __init__(self, node: onnx.NodeProto, index: int, label: str, arrays: list[np.ndarray],
                 names: list[str]):
        super().__init__()
        scale, bias, mean, var = (torch.from_numpy(np.array(a, np.float32)) for a in arrays)
        self.node_index, self.label = index, label
        self.onnx_names = dict(zip(("weight", "bias", "running_mean", "running_var"), names))
        self.eps = float(attr(node, "epsilon", 1e-5))
        self.weight, self.bias = nn.Parameter(scale), nn.Parameter(bias)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def to_onnx(self) -> dict[str, np.ndarray]:
        return {self.onnx_names[k]: _np(getattr(self, k)) for k in self.onnx_names}


class Op(nn.Module):
    """A stateless ONNX node: ``fn(*inputs)`` with the attributes bound at conversion."""

    def __init__(self, op_type: str, label: str, fn: Callable):
        super().__init__()
        self.op_type, self.label, self.fn = op_type, label, fn

    def forward(self, *inputs):
        return self.fn(*inputs)

    def extra_repr(self) -> str:
        return f"{self.op_type} {self.label}"


# ---- the graph module ---------------------------------------------------------------------------

class GraphModule(nn.Module):
    """Runs the ONNX graph: ``forward(*inputs)`` in graph-input order returns one tensor, or a
    tuple in graph-output order. ``steps[i]`` reads ``step_inputs[i]`` and writes
    ``step_outputs[i]`` (empty names are absent optional inputs -> None).

    ``taps`` hooks: ``set_tap(tensor, module)`` replaces a tensor by ``module(tensor)`` right
    where it is produced (graph inputs included), so every consumer sees the same value; fake
    quantization uses it for activations."""

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.input_names, self.output_names = list(inputs), list(outputs)
        self.steps = nn.ModuleList()
        self.step_inputs: list[tuple[str, ...]] = []
        self.step_outputs: list[tuple[str, ...]] = []
        self.consts = nn.Module()
        self.const_names: dict[str, str] = {}  # ONNX tensor -> buffer attribute of self.consts
        self.taps = nn.ModuleDict()
        self.tap_names: dict[str, str] = {}  # ONNX tensor -> key in self.taps

    def add_const(self, name: str, value: torch.Tensor) -> None:
        key = f"c{len(self.const_names)}"
        self.consts.register_buffer(key, value)
        self.const_names[name] = key

    def add_step(self, module: nn.Module, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        self.steps.append(module)
        self.step_inputs.append(tuple(inputs))
        self.step_outputs.append(tuple(outputs))

    def set_tap(self, tensor: str, module: nn.Module) -> None:
        key = self.tap_names.setdefault(tensor, f"t{len(self.tap_names)}")
        self.taps[key] = module

    def fuse(self, first: int, last: int, module: nn.Module) -> None:
        """Replace steps ``first`` and ``last`` by ``module``, run where ``last`` ran, reading
        what ``first`` read and writing what ``last`` wrote (valid when only ``last`` reads
        ``first``'s outputs, e.g. Conv -> BatchNormalization)."""
        if not first < last:
            raise ValueError("fuse: the first step must run before the last")
        self.steps[last] = module
        self.step_inputs[last] = self.step_inputs[first]
        del self.steps[first]
        del self.step_inputs[first]
        del self.step_outputs[first]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env = {name: getattr(self.consts, key) for name, key in self.const_names.items()}
        env[""] = None
        for name, x in zip(self.input_names, inputs):
            env[name] = self._tapped(name, x)
        for module, ins, outs in zip(self.steps, self.step_inputs, self.step_outputs):
            result = module(*(env[n] for n in ins))
            if not isinstance(result, (tuple, list)):
                result = (result,)
            for name, value in zip(outs, result):
                if name:
                    env[name] = self._tapped(name, value)
        out = tuple(env[n] for n in self.output_names)
        return out[0] if len(out) == 1 else out

    def _tapped(self, name: str, value):
        key = self.tap_names.get(name)
        return self.taps[key](value) if key is not None else value

    def weight_layers(self) -> list[WeightLayer]:
        return [m for m in self.modules() if isinstance(m, WeightLayer)]


def to_torch(model: onnx.ModelProto) -> GraphModule:
    """Convert ``model`` (not modified) to a :class:`GraphModule` in eval mode.

    Raises :class:`UnsupportedModelError` naming every op type (and attribute combination) it
    cannot run. A weight shared by several nodes stays a buffer (the nodes run as plain ops), so
    training never unties it."""
    graph = model.graph
    index = GraphIndex(graph)
    opset = opset_version(model)
    inits = {t.name for t in graph.initializer}
    inputs = [v.name for v in graph.input if v.name not in inits]
    net = GraphModule(inputs, [v.name for v in graph.output])
    order = _topological(graph, set(inputs) | inits)
    missing: dict[str, int] = defaultdict(int)
    owned: set[str] = set()
    steps = []
    for i in order:
        node = graph.node[i]
        label = node_label(node, i)
        if node.op_type == "Constant" and is_onnx(node):
            continue
        module = _weight_module(node, i, label, index)
        if module is not None:
            owned.update(module.onnx_names.values())
            steps.append((module, (node.input[0],), tuple(node.output)))
            continue
        build = _OPS.get(node.op_type) if is_onnx(node) else None
        if build is None:
            missing[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
            continue
        try:
            fn = build(node, opset)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{label}: {exc}") from None
        steps.append((Op(node.op_type, label, fn), tuple(node.input), tuple(node.output)))
    if missing:
        ops = ", ".join(f"{op} ({n})" for op, n in sorted(missing.items()))
        raise UnsupportedModelError(f"cannot convert to torch: unsupported op types {ops}")
    needed = {n for _, ins, _ in steps for n in ins}
    for name in sorted(needed - owned):
        value = index.const(name)
        if value is not None:
            net.add_const(name, torch.from_numpy(np.array(value)))
    for module, ins, outs in steps:
        net.add_step(module, ins, outs)
    return net.eval()


def weights_to_onnx(net: GraphModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every layer's current parameters written back under their ONNX
    names (FP32, ONNX layout). ``model`` must be the one ``net`` was converted from."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out.graph)
    for m in net.modules():
        if isinstance(m, WeightLayer):
            arrays = m.to_onnx(m.weight.detach(), None if m.bias is None else m.bias.detach())
        elif isinstance(m, BatchNorm):
            arrays = m.to_onnx()
        else:
            continue
        for name, value in arrays.items():
            index.set_const(name, value)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _topological(graph: onnx.GraphProto, available: set[str]) -> list[int]:
    """Node indices in an order where every input is produced first (stable: ONNX order
    when it already is topological)."""
    produced = set(available) | {""}
    pending = list(range(len(graph.node)))
    order: list[int] = []
    while pending:
        rest = []
        for i in pending:
            node = graph.node[i]
            if all(n in produced for n in node.input):
                order.append(i)
                produced.update(node.output)
            else:
                rest.append(i)
        if len(rest) == len(pending):
            node = graph.node[rest[0]]
            lost = [n for n in node.input if n not in produced]
            raise UnsupportedModelError(f"{node_label(node, rest[0])}: input '{lost[0]}' is "
                                        "never produced (a cycle or a missing tensor)")
        pending = rest
    return order


def _weight_module(node: onnx.NodeProto, i: int, label: str, index: GraphIndex):
    """A WeightLayer / BatchNorm for nodes whose parameters are constants owned by the node
    alone; None when the node must run as a plain op."""
    op = node.op_type
    if not is_onnx(node) or op not in ("Conv", "ConvTranspose", "Gemm",
                                                         "MatMul", "BatchNormalization"):
        return None
    params = list(node.input[1:])
    values = [index.const(n) if n else None for n in params]
    if any(n and (v is None or index.shared(n) or n in index.graph_outputs)
           for n, v in zip(params, values)):
        return None
    if any(v is not None and not np.issubdtype(v.dtype, np.floating) for v in values):
        return None
    names = {k: n for k, n in zip(("weight", "bias"), params) if n}
    if op == "Conv":
        return Conv(node, i, label, values[0], values[1] if len(values) > 1 else None, names)
    if op == "ConvTranspose":
        return ConvTranspose(node, i, label, values[0], values[1] if len(values) > 1 else None,
                             names)
    if op == "BatchNormalization":
        if len(node.output) > 1 or len(params) != 4:
            return None
        return BatchNorm(node, i, label, values, params)
    if op == "MatMul":
        w = values[0]
        return Linear(i, label, w.T, None, names, True, None) if w.ndim == 2 else None
    return _gemm(node, i, label, values, names)


def _gemm(node, i, label, values, names):
    w = values[0]
    bias = values[1] if len(values) > 1 else None
    if (attr(node, "alpha", 1.0) != 1.0 or attr(node, "transA", 0) or w.ndim != 2
            or (bias is not None and attr(node, "beta", 1.0) != 1.0)):
        return None
    trans_b = bool(attr(node, "transB", 0))
    nout = w.shape[0] if trans_b else w.shape[1]
    if bias is not None and (bias.size != nout or bias.shape not in ((nout,), (1, nout))):
        return None
    return Linear(i, label, w if trans_b else w.T, None if bias is None else bias.reshape(-1),
                  names, not trans_b, None if bias is None else bias.shape)


# ---- padding shared by Conv and pools ----------------------------------------------------------

class _Pads:
    """ONNX pads/auto_pad -> (padded input, symmetric torch padding)."""

    def __init__(self, node, dims, kernel, strides, dilations, label, fill: float = 0.0):
        auto = attr(node, "auto_pad", b"NOTSET")
        self.auto = auto.decode() if isinstance(auto, bytes) else auto
        self.kernel, self.strides, self.dilations, self.fill = kernel, strides, dilations, fill
        pads = list(attr(node, "pads", [0] * 2 * dims))
        if self.auto == "VALID":
            pads = [0] * 2 * dims
        elif self.auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER"):
            raise UnsupportedModelError(f"{label}: auto_pad {self.auto}")
        self.begin, self.end = pads[:dims], pads[dims:]

    def amounts(self, x) -> tuple[list[int], list[int]]:
        if self.auto not in ("SAME_UPPER", "SAME_LOWER"):
            return self.begin, self.end
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], self.kernel, self.strides, self.dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if self.auto == "SAME_UPPER" else big)
            end.append(big if self.auto == "SAME_UPPER" else small)
        return begin, end

    def __call__(self, x, limit: Sequence[int] | None = None):
        begin, end = self.amounts(x)
        if begin == end and (limit is None or all(b <= m for b, m in zip(begin, limit))):
            return x, tuple(begin)
        flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
        return F.pad(x, flat, value=self.fill), 0


# ---- stateless ops ------------------------------------------------------------------------------

def _s(node, name, default):
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _binary(fn):
    def build(node, opset):
        def run(a, b):
            if not a.is_floating_point() and fn is torch.div:
                return torch.div(a, b, rounding_mode="trunc")
            return fn(a, b)
        return run
    return build


def _unary(fn):
    return lambda node, opset: fn


def _clip(node, opset):
    if opset < 11:
        low, high = attr(node, "min", None), attr(node, "max", None)
        return lambda x: torch.clamp(x, low, high)
    return lambda x, low=None, high=None: torch.clamp(x, low, high)


def _leaky(node, opset):
    alpha = attr(node, "alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


def _prelu(node, opset):
    return lambda x, slope: torch.where(x < 0, x * slope, x)


def _hardsigmoid(node, opset):
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


def _hardswish(node, opset):
    return lambda x: x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def _softmax(node, opset):
    axis = attr(node, "axis", -1 if opset >= 13 else 1)

    def run(x):
        if opset >= 13 or axis % x.ndim == x.ndim - 1:
            return torch.softmax(x, axis)
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return torch.softmax(flat, 1).reshape(x.shape)
    return run


def _pool(kind: str):
    def build(node, opset):
        kernel = tuple(attr(node, "kernel_shape"))
        dims = len(kernel)
        strides = tuple(attr(node, "strides", [1] * dims))
        dilations = tuple(attr(node, "dilations", [1] * dims))
        ceil = bool(attr(node, "ceil_mode", 0))
        if kind == "max":
            if len(node.output) > 1 and node.output[1]:
                raise UnsupportedModelError("MaxPool with an Indices output")
            if attr(node, "storage_order", 0):
                raise UnsupportedModelError("MaxPool with storage_order 1")
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            pads = _Pads(node, dims, kernel, strides, dilations, "", fill=-math.inf)
            half = [k // 2 for k in kernel]

            def run_max(x):
                x, padding = pads(x, half)
                return fn(x, kernel, strides, padding, dilations, ceil)
            return run_max
        if dilations != (1,) * dims:
            raise UnsupportedModelError("AveragePool with dilations")
        include = bool(attr(node, "count_include_pad", 0))
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        pads = _Pads(node, dims, kernel, strides, dilations, "")

        def run(x):
            begin, end = pads.amounts(x)
            if begin != end or any(b > k // 2 for b, k in zip(begin, kernel)):
                if not include and any(begin + end):
                    raise UnsupportedModelError("AveragePool with asymmetric pads that are not "
                                                "counted (count_include_pad=0)")
            x, padding = pads(x, [k // 2 for k in kernel])
            return fn(x, kernel, strides, padding, ceil, include)
        return run
    return build


def _global_pool(kind: str):
    def build(node, opset):
        def run(x):
            dims = tuple(range(2, x.ndim))
            return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)
        return run
    return build


def _flatten(node, opset):
    axis = attr(node, "axis", 1)

    def run(x):
        a = axis % x.ndim if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:a])), -1)
    return run


def _reshape(node, opset):
    allowzero = attr(node, "allowzero", 0)

    def run(x, shape):
        dims = _ints(shape)
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)
    return run


def _concat(node, opset):
    axis = attr(node, "axis")
    return lambda *xs: torch.cat(xs, axis)


def _transpose(node, opset):
    perm = attr(node, "perm")
    return lambda x: x.permute(perm if perm is not None else list(range(x.ndim))[::-1])


def _axes_op(fn):
    """Squeeze/Unsqueeze/ReduceMean: axes as an attribute (old opsets) or an input."""
    def build(node, opset):
        fixed = attr(node, "axes")
        keep = attr(node, "keepdims", 1)
        noop = attr(node, "noop_with_empty_axes", 0)

        def run(x, axes=None):
            ax = fixed if fixed is not None else (_ints(axes) if axes is not None else None)
            return fn(x, ax, keep, noop)
        return run
    return build


def _squeeze(x, axes, keep, noop):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


def _unsqueeze(x, axes, keep, noop):
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _reduce_mean(x, axes, keep, noop):
    if not axes:
        if noop:
            return x
        axes = list(range(x.ndim))
    return x.mean(tuple(axes), keepdim=bool(keep))


def _shape(node, opset):
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _gather(node, opset):
    axis = attr(node, "axis", 0)

    def run(x, idx):
        a = axis % x.ndim
        flat = idx.reshape(-1).long() % x.shape[a]
        out = x.index_select(a, flat)
        return out.reshape(x.shape[:a] + idx.shape + x.shape[a + 1:])
    return run


def _slice(node, opset):
    if opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes")
        return lambda x: _do_slice(x, starts, ends, axes, None)
    return lambda x, starts, ends, axes=None, steps=None: _do_slice(
        x, _ints(starts), _ints(ends), None if axes is None else _ints(axes),
        None if steps is None else _ints(steps))


def _do_slice(x, starts, ends, axes, steps):
    index = [slice(None)] * x.ndim
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 1:
            raise UnsupportedModelError("Slice with a negative step")
        size = x.shape[a]
        index[a] = slice(max(-size, min(s, size)), max(-size, min(e, size)), st)
    return x[tuple(index)]


def _split(node, opset):
    axis = attr(node, "axis", 0)
    fixed = attr(node, "split")
    count = len(node.output)

    def run(x, split=None):
        sizes = fixed if fixed is not None else (_ints(split) if split is not None else None)
        if sizes is None:
            size = x.shape[axis]
            sizes = [-(-size // count)] * (count - 1)
            sizes.append(size - sum(sizes))
        return torch.split(x, list(sizes), axis)
    return run


def _cast(node, opset):
    to = attr(node, "to")
    if to not in _DTYPES:
        raise UnsupportedModelError(f"Cast to {onnx.TensorProto.DataType.Name(to)}")
    dtype = _DTYPES[to]
    return lambda x: x.to(dtype)


def _resize(node, opset):
    mode = _s(node, "mode", "nearest")
    ctm = _s(node, "coordinate_transformation_mode",
             "asymmetric" if opset < 11 else "half_pixel")
    nearest = _s(node, "nearest_mode", "round_prefer_floor")
    for name, default in (("antialias", 0), ("exclude_outside", 0), ("axes", None),
                          ("keep_aspect_ratio_policy", "stretch")):
        if _s(node, name, default) != default:
            raise UnsupportedModelError(f"Resize with {name}")
    if mode == "nearest" and ctm == "asymmetric" and nearest == "floor":
        kw = dict(mode="nearest")
    elif mode == "nearest" and ctm == "half_pixel" and nearest == "round_prefer_ceil":
        kw = dict(mode="nearest-exact")
    elif mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kw = dict(mode="linear", align_corners=ctm == "align_corners")
    else:
        raise UnsupportedModelError(f"Resize mode {mode}, coordinate_transformation_mode {ctm}, "
                                    f"nearest_mode {nearest}")

    def run(x, roi=None, scales=None, sizes=None):
        if opset < 11:
            scales, sizes = roi, None
        options = dict(kw)
        if options["mode"] == "linear":
            options["mode"] = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
        if sizes is not None and sizes.numel():
            dims = _ints(sizes)
            if dims[:2] != list(x.shape[:2]):
                raise UnsupportedModelError("Resize of the batch or channel axis")
            return F.interpolate(x, size=dims[2:], **options)
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise UnsupportedModelError("Resize of the batch or channel axis")
        return F.interpolate(x, scale_factor=factors[2:], recompute_scale_factor=False,
                             **options)
    return run


def _pad(node, opset):
    mode = _s(node, "mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise UnsupportedModelError(f"Pad mode {mode}")

    def run(x, pads=None, value=None, axes=None):
        p = attr(node, "pads") if opset < 11 else _ints(pads)
        fill = attr(node, "value", 0.0) if opset < 11 else (
            0.0 if value is None or not value.numel() else float(value.reshape(-1)[0]))
        n = len(p) // 2
        ax = list(range(x.ndim)) if axes is None else [a % x.ndim for a in _ints(axes)]
        begin, end = [0] * x.ndim, [0] * x.ndim
        for k, a in enumerate(ax[:n]):
            begin[a], end[a] = p[k], p[k + n]
        first = next((d for d in range(x.ndim) if begin[d] or end[d]), x.ndim)
        flat = [v for d in range(x.ndim - 1, first - 1, -1) for v in (begin[d], end[d])]
        if not flat:
            return x
        if torch_mode == "constant":
            return F.pad(x, flat, value=fill)
        return F.pad(x, flat, mode=torch_mode)
    return run


def _identity(node, opset):
    return lambda x: x


def _dropout(node, opset):
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedModelError("Dropout with a mask output")
    return lambda x, *rest: x


def _constant_of_shape(node, opset):
    value = attr(node, "value")
    fill = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return lambda shape: torch.full(_ints(shape), fill.reshape(-1)[0].item(),
                                    dtype=_DTYPES[onnx.helper.np_dtype_to_tensor_dtype(
                                        fill.dtype)])


def _variadic(fn):
    def build(node, opset):
        def run(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out
        return run
    return build


_OPS: dict[str, Callable] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _binary(torch.div), "Pow": _binary(torch.pow),
    "Sum": _variadic(torch.add), "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Erf": _unary(torch.erf),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "LeakyRelu": _leaky, "PRelu": _prelu, "Clip": _clip, "HardSigmoid": _hardsigmoid,
    "HardSwish": _hardswish, "Softmax": _softmax,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"), "GlobalMaxPool": _global_pool("max"),
    "Flatten": _flatten, "Reshape": _reshape, "Concat": _concat, "Transpose": _transpose,
    "Squeeze": _axes_op(_squeeze), "Unsqueeze": _axes_op(_unsqueeze),
    "ReduceMean": _axes_op(_reduce_mean), "Shape": _shape, "Gather": _gather, "Slice": _slice,
    "Split": _split, "Cast": _cast, "Resize": _resize, "Upsample": _resize, "Pad": _pad,
    "Identity": _identity, "Dropout": _dropout, "ConstantOfShape": _constant_of_shape,
    # weight layers whose parameters are computed or shared run as plain ops:
    "Conv": lambda node, opset: _plain_conv(node),
    "MatMul": lambda node, opset: torch.matmul,
    "Gemm": lambda node, opset: _plain_gemm(node),
    "BatchNormalization": lambda node, opset: _plain_bn(node),
}


def _plain_conv(node):
    def run(x, w, b=None):
        dims = w.ndim - 2
        strides = tuple(attr(node, "strides", [1] * dims))
        dilations = tuple(attr(node, "dilations", [1] * dims))
        pads = _Pads(node, dims, tuple(w.shape[2:]), strides, dilations, node.name)
        x, padding = pads(x)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
        return fn(x, w, b, strides, padding, dilations, int(attr(node, "group", 1)))
    return run


def _plain_gemm(node):
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)

    def run(a, b, c=None):
        y = (a.T if ta else a) @ (b.T if tb else b)
        y = y * alpha if alpha != 1.0 else y
        return y if c is None else y + (c * beta if beta != 1.0 else c)
    return run


def _plain_bn(node):
    if len(node.output) > 1:
        raise UnsupportedModelError("BatchNormalization in training mode (several outputs)")
    eps = attr(node, "epsilon", 1e-5)
    return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, eps)
