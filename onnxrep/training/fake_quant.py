"""Fake quantization of a :class:`~onnxrep.training.convert.GraphModule`, placed and
computed as onnxruntime's QDQ format will run it after export.

Numerics (the ones onnxruntime's quantizer uses; straight-through estimator for gradients):

- weights: symmetric int8 in [-Q, Q], Q = 127 (63 with ``reduce_range``), zero point 0,
  scale = max |w| / Q per tensor or per output channel (1 for an all-zero range);
  q(w) = clamp(round(w / s), -Q, Q) * s. ``reduce_range``: onnxruntime's u8s8 kernels on CPUs
  without VNNI (AVX2 ``vpmaddubsw``) add pairs of u8 x s8 products in int16 and saturate when
  |w1| + |w2| > 128; 7-bit weights can never saturate, so the deployed model computes exactly
  what was trained.
- biases: int32 on the grid s_x s_w (s_x: the layer input's scale), as onnxruntime needs for
  QLinearConv; q(b) = clamp(round(b / (s_x s_w))) s_x s_w.
- activations: the target's codes [qmin, qmax] (``Target.activation_qrange``: uint8 0..255
  asymmetric by default, int8 -127..127 symmetric for TensorRT), range [min(lo, 0), max(hi,
  0)] (symmetric: [-a, a], a = max(|lo|, |hi|)), s = (hi - lo) / (qmax - qmin),
  z = clamp(round(qmin - lo / s)); q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) * s,
  onnxruntime's formula. Ranges are min/max over the calibration data first, then an
  exponential moving average of each training batch's min/max (lo += c (batch_lo - lo),
  c = ``averaging_constant``; c = 0 keeps the calibrated ranges). Tensors tied into a group
  (a Concat's inputs and output under TensorRT) quantize with the union of their ranges: one
  scale.
- biases of a target without int32 biases (TensorRT) stay float.

Placement, as ``onnxrep quantize --target`` places Q/DQ. Targets that quantize outputs
(onnxruntime, openvino: onnxruntime's QDQ quantizer with Conv, Gemm, MatMul, Relu and Clip
quantized): the input of every Conv/ConvTranspose/Gemm/MatMul layer, and its output *after* a
Relu or Clip that is its only reader (onnxruntime gives the conv output the activation's range
and fuses Conv + Relu into QLinearConv; never a pair between conv and activation). Targets that
quantize op inputs (TensorRT): the tensors of ``Target.input_layout`` (the computed inputs of
the target's op types, residual-Add conv branches left float). A tensor that is a graph output
stays float. A PTQ start (``prepare(follow=qdq)``) also quantizes every other tensor its QDQ
model quantizes (a pooling op's input and output), so training computes what PTQ wrote. Every
reader of a quantized tensor sees the quantized value.

Conv -> BatchNormalization pairs train as one fused layer (torch.ao.nn.intrinsic.qat.ConvBn):
with f = gamma / sqrt(running_var + eps), the weight is quantized as q(W f); in training
y = BN_batch(conv(x, q(W f)) / f + b) with batch statistics (synchronized across
DistributedDataParallel ranks) that also update the running ones; in eval, or once BN is
frozen, y = conv(x, q(W f)) + (b - running_mean) f + beta: exactly the folded conv that
export writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
import torch
import torch.distributed as dist
from onnx import numpy_helper
from torch import nn

from onnxrep.passes.base import Skip
from onnxrep.training.config import FakeQuantConfig
from onnxrep.training.convert import BatchNorm, Conv, ConvTranspose, GraphModule, Op, WeightLayer

ACT_QMIN, ACT_QMAX = 0, 255
WEIGHT_QMAX = 127
REDUCED_WEIGHT_QMAX = 63
INT32_MAX = 2**31 - 1
FUSED_ACTIVATIONS = ("Relu", "Clip")


class Mode(enum.Enum):
    CALIBRATE = "calibrate"  # activations: record min/max, pass through; weights float
    TRAIN = "train"  # activations: EMA of batch min/max (in training mode), quantize
    EVAL = "eval"  # fixed ranges, quantize


_GROUP = contextvars.ContextVar("onnxrep_qat_group", default=None)


@contextlib.contextmanager
def process_group(group) -> Iterator[None]:
    """Reduce BN statistics and activation ranges over ``group`` inside the block (the QAT flow
    under torchrun: a group of its own, so these collectives never interleave with DDP's)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ActQuant(nn.Module):
    """Fake quantization of one activation tensor to codes [qmin, qmax] (uint8 asymmetric by
    default), with its range observer."""

    def __init__(self, tensor: str, averaging_constant: float,
                 qrange: tuple[int, int] = (ACT_QMIN, ACT_QMAX), symmetric: bool = False):
        super().__init__()
        self.tensor, self.c = tensor, averaging_constant
        self.qmin, self.qmax = qrange
        self.symmetric = symmetric
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.mode = Mode.EVAL
        self._group: list[ActQuant] = [self]  # a plain list: tied quantizers, not submodules

    def tie(self, others: list["ActQuant"]) -> None:
        """Share one scale with ``others``: each quantizes with the union of all ranges."""
        group = [self, *(o for o in others if o is not self)]
        for q in group:
            q._group = group

    @property
    def zero_point_dtype(self) -> type:
        return np.uint8 if self.qmin >= 0 else np.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is Mode.CALIBRATE or (self.mode is Mode.TRAIN and self.training
                                           and self.c > 0):
            self._observe(x.detach())
        if self.mode is Mode.CALIBRATE:
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        if _world() > 1:
            lo_hi = torch.stack([-lo, hi]).float()
            dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX, group=_GROUP.get())
            lo, hi = -lo_hi[0], lo_hi[1]
        if self.mode is Mode.CALIBRATE or not torch.isfinite(self.min_val):
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            self.min_val.add_(self.c * (lo - self.min_val))
            self.max_val.add_(self.c * (hi - self.max_val))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32 [1], zero point int32 [1]) as onnxruntime computes them, over the
        union of the tied group's ranges."""
        if not all(torch.isfinite(q.min_val) for q in self._group):
            raise RuntimeError(f"activation '{self.tensor}' has no range: calibrate first")
        lo = torch.clamp(torch.stack([q.min_val for q in self._group]).min(), max=0.0)
        hi = torch.clamp(torch.stack([q.max_val for q in self._group]).max(), min=0.0)
        if self.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        scale = (hi - lo) / (self.qmax - self.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(1).float()
        zero_point = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        return scale.detach(), zero_point.reshape(1).to(torch.int32)

    def extra_repr(self) -> str:
        return f"'{self.tensor}' [{self.min_val.item():.4g}, {self.max_val.item():.4g}]"


def weight_scale(w: torch.Tensor, axis: int | None, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """max |w| / qmax over the tensor (``axis`` None) or per index of ``axis``; 1 where zero."""
    w = w.detach()
    if axis is None:
        amax = w.abs().max().reshape(1)
    else:
        amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).max(1).values
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def fake_quant_weight(w: torch.Tensor, axis: int | None, qmax: int = WEIGHT_QMAX
                      ) -> torch.Tensor:
    scale = weight_scale(w, axis, qmax)
    zero = torch.zeros(scale.shape, dtype=torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(w, scale, zero, -qmax, qmax)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, -qmax, qmax)


@dataclass(frozen=True)
class Quantized:
    """A layer's int8 weight codes and scale (torch layout); its bias as int32 codes and scale,
    or as float when its input is not quantized (``float_bias``)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    bias_scale: torch.Tensor | None
    float_bias: torch.Tensor | None


class QuantLayer(nn.Module):
    """A weight layer (optionally with its BatchNormalization) with int8 fake-quant weights."""

    def __init__(self, layer: WeightLayer, bn: BatchNorm | None, config: FakeQuantConfig):
        super().__init__()
        self.layer, self.bn = layer, bn
        self.axis = layer.out_axis if config.per_channel else None
        self.qmax = REDUCED_WEIGHT_QMAX if config.reduce_range else WEIGHT_QMAX
        self.momentum = config.bn_momentum
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.quantize_weights = True
        self._input: list[ActQuant] = []  # a plain list: the quantizer belongs to its tap

    def set_input_quant(self, act: ActQuant) -> None:
        """The quantizer of this layer's input, whose scale s_x sets the bias grid s_x s_w."""
        self._input = [act]

    @property
    def label(self) -> str:
        return self.layer.label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training and not bool(self.bn_frozen):
            return self._train_bn(x)
        w, b = self.folded()
        if not self.quantize_weights:
            return self.layer.apply(x, w, b)
        codes = self._bias_codes(b, weight_scale(w, self.axis, self.qmax))
        if codes is not None:
            b = b + (codes[0] * codes[1] - b).detach()  # straight-through
        return self.layer.apply(x, fake_quant_weight(w, self.axis, self.qmax), b)

    def _q(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.axis, self.qmax) if self.quantize_weights else w

    def _bias_codes(self, b, w_scale) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int32 bias codes clamp(round(b / (s_x s_w))) and their scale, or None without a
        bias or an input quantizer."""
        if b is None or not self._input:
            return None
        scale = self._input[0].qparams()[0] * w_scale
        return torch.clamp(torch.round(b.detach() / scale), -INT32_MAX, INT32_MAX), scale

    def _channel(self, v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return v.reshape(shape)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight and bias with BN (running statistics) folded in, torch layout."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b0 = b if b is not None else torch.zeros_like(bn.running_mean)
        return (w * self._channel(f, w.ndim, self.layer.out_axis),
                (b0 - bn.running_mean) * f + bn.bias)

    def quantized(self) -> Quantized:
        """The folded layer as export writes it (exactly what ``forward`` computes in eval)."""
        with torch.no_grad():
            w, b = self.folded()
            scale = weight_scale(w, self.axis, self.qmax)
            codes = torch.round(fake_quant_weight(w, self.axis, self.qmax) /
                                (scale if self.axis is None else
                                 self._channel(scale, w.ndim, self.axis)))
            bias = self._bias_codes(b, scale)
        if bias is None:
            return Quantized(codes.to(torch.int8), scale, None, None, b)
        return Quantized(codes.to(torch.int8), scale, bias[0].to(torch.int32), bias[1], None)

    def _train_bn(self, x: torch.Tensor) -> torch.Tensor:
        """BN with batch statistics on z = y / f + b, y = conv(x, q(W f)), in one pass over y:
        mean_z = mean_y / f + b, var_z = var_y / f^2, so
        BN(z) = y * gamma r / f + beta - mean_y gamma r / f with r = 1 / sqrt(var_z + eps)."""
        bn, layer = self.bn, self.layer
        f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        f = torch.where(f == 0, torch.ones_like(f), f)
        w = layer.weight * self._channel(f, layer.weight.ndim, layer.out_axis)
        y = layer.apply(x, self._q(w), None)
        mean, var, n = batch_moments(y)
        mean_z = mean / f + (layer.bias if layer.bias is not None else 0)
        var_z = var / (f * f)
        with torch.no_grad():
            m = self.momentum
            bn.running_mean.mul_(1 - m).add_(m * mean_z.detach())
            bn.running_var.mul_(1 - m).add_(m * var_z.detach() * (n / max(n - 1, 1)))
        k = bn.weight * torch.rsqrt(var_z + bn.eps) / f
        return torch.addcmul(self._channel(bn.bias - mean * k, y.ndim, 1), y,
                             self._channel(k, y.ndim, 1))

    def extra_repr(self) -> str:
        kind = ("per-channel" if self.axis is not None else "per-tensor") + (
            ", 7-bit" if self.qmax == REDUCED_WEIGHT_QMAX else "")
        return f"{self.label}{' + BN' if self.bn is not None else ''}, {kind}"


def batch_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (axis 1) mean and biased variance over every other axis, over the global
    batch when running under DistributedDataParallel (two all-reduces, autograd-aware)."""
    dims = [d for d in range(y.ndim) if d != 1]
    n_local = y.numel() // y.shape[1]
    if _world() == 1:
        var, mean = torch.var_mean(y, dims, correction=0)
        return mean, var, n_local
    count = torch.tensor([float(n_local)])
    dist.all_reduce(count, group=_GROUP.get())
    n = int(count.item())
    mean = _AllReduceSum.apply(y.sum(dims)) / n
    centered = y - mean.reshape([1, -1] + [1] * (y.ndim - 2))
    var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
    return mean, var, n


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=_GROUP.get())
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=_GROUP.get())
        return grad


@dataclass
class QuantPlan:
    """What :func:`prepare` did: the fake-quant layers (each knows its ONNX node, and its BN
    node when fused), the activation quantizers by tensor name, the BatchNorms left unfused
    (trained as float per-channel affines) and what it left alone."""

    layers: list[QuantLayer] = field(default_factory=list)
    activations: dict[str, ActQuant] = field(default_factory=dict)
    batchnorms: list[BatchNorm] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def set_mode(self, mode: Mode) -> None:
        for q in self.activations.values():
            q.mode = mode
        for layer in self.layers:
            layer.quantize_weights = mode is not Mode.CALIBRATE

    def freeze_bn(self) -> None:
        for layer in self.layers:
            layer.bn_frozen.fill_(True)


def prepare(net: GraphModule, config: FakeQuantConfig | None = None,
            layout: tuple[list[str], list[list[str]]] | None = None,
            follow: onnx.ModelProto | None = None) -> QuantPlan:
    """Insert fake quantization into ``net`` (mutated in place) and return the plan.

    ``layout``: for a target that quantizes op inputs (TensorRT), the tensors to quantize and
    the groups sharing a scale, ``config.target.input_layout(model)`` of the ONNX model ``net``
    was converted from; None for a target that quantizes outputs (its placement is found
    here). ``follow``: a QDQ model of the same graph (a PTQ start); every tensor it quantizes
    that ``net`` computes is quantized too (e.g. the input and output of a pooling op, which
    onnxruntime's quantizer also wraps), except graph outputs, which training keeps float."""
    config = config or FakeQuantConfig()
    target = config.target
    if (layout is None) != target.quantizes_outputs:
        raise ValueError(f"target {target.name}: layout must be "
                         + ("None" if target.quantizes_outputs else "target.input_layout(model)"))
    plan = QuantPlan()
    _fuse_batchnorm(net, config, plan)
    outputs = set(net.output_names)
    known = set(net.input_names) | {t for outs in net.step_outputs for t in outs}

    def quantize(tensor: str, label: str) -> None:
        if tensor in outputs:
            plan.skips.append(Skip(label, f"'{tensor}' is a graph output: kept float"))
        elif tensor not in known:
            plan.skips.append(Skip(label, f"'{tensor}' is not computed in the torch graph "
                                   "(fused away): not quantized"))
        elif tensor not in plan.activations:
            plan.activations[tensor] = ActQuant(tensor, config.averaging_constant,
                                                target.activation_qrange(),
                                                target.activation_symmetric)
            net.set_tap(tensor, plan.activations[tensor])

    readers = _readers(net)
    for i, step in enumerate(net.steps):
        if isinstance(step, BatchNorm):
            plan.batchnorms.append(step)
        if isinstance(step, WeightLayer):
            step = net.steps[i] = QuantLayer(step, None, config)
        if not isinstance(step, QuantLayer):
            continue
        plan.layers.append(step)
        if layout is None:
            for tensor in (net.step_inputs[i][0], _after_activation(net, i, readers, outputs)):
                quantize(tensor, step.label)
    if layout is not None:
        tensors, groups = layout
        for tensor in tensors:
            quantize(tensor, tensor)
        for group in groups:
            tied = [plan.activations[t] for t in group if t in plan.activations]
            if len(tied) > 1:
                tied[0].tie(tied[1:])
    if follow is not None:
        for tensor in quantized_tensors(follow):
            if tensor in known and tensor not in outputs:
                quantize(tensor, tensor)
    if target.quantize_bias:  # int32 biases on the grid s_x s_w need the input's scale
        for i, step in enumerate(net.steps):
            if isinstance(step, QuantLayer) and net.step_inputs[i][0] in plan.activations:
                step.set_input_quant(plan.activations[net.step_inputs[i][0]])
    net.train(net.training)  # the new modules take the graph's mode
    return plan


def quantized_tensors(qdq: onnx.ModelProto) -> list[str]:
    """The computed tensors a QDQ model quantizes (the inputs of its activation
    QuantizeLinear nodes; weights are initializers)."""
    inits = {t.name for t in qdq.graph.initializer}
    return list(dict.fromkeys(n.input[0] for n in qdq.graph.node
                              if n.op_type == "QuantizeLinear" and n.input[0] not in inits))


def ranges_from_qdq(plan: QuantPlan, qdq: onnx.ModelProto) -> int:
    """Give every activation quantizer whose tensor ``qdq`` quantizes the range its
    QuantizeLinear encodes, lo = (qmin - z) s, hi = (qmax - z) s, so it computes that scale and
    zero point again; returns how many were set. A PTQ start needs this: its float model's
    biases are corrected for the quantized model's mean errors, so run in float its activations
    drift (PP-LCNet page orientation: a late conv output spans [-15.8, 39.8] there against
    [-8.8, 20.4] in the model PTQ calibrated), and ranges measured on it would not be PTQ's."""
    inits = {t.name: t for t in qdq.graph.initializer}
    done = set()
    for node in qdq.graph.node:
        act = plan.activations.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if act is None or node.input[1] not in inits:
            continue
        scale = float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
        zero = (float(numpy_helper.to_array(inits[node.input[2]]).reshape(-1)[0])
                if len(node.input) > 2 and node.input[2] in inits else 0.0)
        act.min_val.fill_((act.qmin - zero) * scale)
        act.max_val.fill_((act.qmax - zero) * scale)
        done.add(node.input[0])
    return len(done)


def _readers(net: GraphModule) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for i, ins in enumerate(net.step_inputs):
        for name in ins:
            readers.setdefault(name, []).append(i)
    return readers


def _after_activation(net: GraphModule, i: int, readers, outputs) -> str:
    """The layer's output, or the output of a Relu/Clip that is its only reader."""
    tensor = net.step_outputs[i][0]
    users = readers.get(tensor, [])
    if tensor in outputs or len(users) != 1:
        return tensor
    step = net.steps[users[0]]
    if isinstance(step, Op) and step.op_type in FUSED_ACTIVATIONS:
        return net.step_outputs[users[0]][0]
    return tensor


def _fuse_batchnorm(net: GraphModule, config: FakeQuantConfig, plan: QuantPlan) -> None:
    """Conv/ConvTranspose (group 1) whose only reader is a BatchNorm -> one QuantLayer."""
    outputs = set(net.output_names)
    i = 0
    while i < len(net.steps):
        j = _bn_reader(net, i, outputs)
        if j is not None:
            step = net.steps[i]
            if isinstance(step, ConvTranspose) and step.groups != 1:
                plan.skips.append(Skip(step.label, "grouped ConvTranspose: its "
                                       "BatchNormalization is not folded"))
            else:
                net.fuse(i, j, QuantLayer(step, net.steps[j], config))
                continue
        i += 1


def _bn_reader(net: GraphModule, i: int, outputs: set[str]) -> int | None:
    if not isinstance(net.steps[i], (Conv, ConvTranspose)):
        return None
    tensor = net.step_outputs[i][0]
    users = _readers(net).get(tensor, [])
    if tensor in outputs or len(users) != 1 or not isinstance(net.steps[users[0]], BatchNorm):
        return None
    return users[0]
