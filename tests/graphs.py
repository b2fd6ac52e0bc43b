"""Tiny ONNX graphs for tests, built with onnx.helper.

``Chain`` appends layers to a single tensor path; it tracks channels and spatial size so
Flatten -> Gemm gets the right feature count. All weights are seeded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Chain:
    def __init__(self, channels: int = 3, hw: tuple[int, int] = (8, 8), seed: int = 0,
                 opset: int = 17, batch="N"):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.channels, self.hw = channels, hw
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     [batch, channels, *hw])]
        self.tensor = "input"
        self.features: int | None = None
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> "Chain":
        out = self._name("t")
        self.nodes.append(helper.make_node(op, [self.tensor, *inputs], [out],
                                           name=name if name is not None else self._name(op),
                                           **attrs))
        self.tensor = out
        return self

    def conv(self, cout: int, k: int = 3, group: int = 1, stride: int = 1, pad: int | None = None,
             bias: bool = True, scale: float = 0.5, outliers: dict | None = None,
             group_attr: bool = True, name: str | None = None, dead: tuple = ()) -> "Chain":
        """A Conv; ``outliers`` maps output channel -> factor; ``dead`` zeroes output channels."""
        cin = self.channels
        w = self.rng.normal(0, scale, (cout, cin // group, k, k)).astype(np.float32)
        for c, f in (outliers or {}).items():
            w[c] *= f
        b = self.rng.normal(0, 0.2, cout).astype(np.float32)
        for c in dead:
            w[c] = 0
            b[c] = 0
        pad = k // 2 if pad is None else pad
        inputs = [self.const(w, "W")] + ([self.const(b, "B")] if bias else [])
        attrs = dict(kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])
        if group_attr:
            attrs["group"] = group
        self.node("Conv", inputs, name, **attrs)
        self.channels = cout
        h, w_ = self.hw
        self.hw = ((h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1)
        return self

    def relu(self, **kw) -> "Chain":
        return self.node("Relu", [], **kw)

    def flatten(self, reshape: bool = False) -> "Chain":
        if reshape:
            self.node("Reshape", [self.const(np.array([0, -1], np.int64), "shape")])
        else:
            self.node("Flatten", [], axis=1)
        self.features = self.channels * self.hw[0] * self.hw[1]
        return self

    def gap(self) -> "Chain":
        self.node("GlobalAveragePool", [])
        self.hw = (1, 1)
        return self

    def gemm(self, nout: int, trans_b: bool = True, scale: float = 0.3,
             name: str | None = None) -> "Chain":
        k = self.features
        w = self.rng.normal(0, scale, (nout, k) if trans_b else (k, nout)).astype(np.float32)
        b = self.rng.normal(0, 0.1, nout).astype(np.float32)
        self.node("Gemm", [self.const(w, "W"), self.const(b, "B")], name, transB=int(trans_b))
        self.features, self.channels = nout, nout
        return self

    def matmul(self, nout: int, scale: float = 0.3) -> "Chain":
        w = self.rng.normal(0, scale, (self.features, nout)).astype(np.float32)
        self.node("MatMul", [self.const(w, "W")])
        self.features, self.channels = nout, nout
        return self

    def build(self) -> onnx.ModelProto:
        batch = self.inputs[0].type.tensor_type.shape.dim[0]
        batch = batch.dim_param or batch.dim_value
        shape = [batch, self.features] if self.features else [batch, self.channels, *self.hw]
        out = helper.make_tensor_value_info(self.tensor, TensorProto.FLOAT, shape)
        graph = helper.make_graph(self.nodes, "test", self.inputs, [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 8)
        onnx.checker.check_model(model)
        return model


def batch_for(model: onnx.ModelProto, n: int = 48, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal inputs for ``model``'s first input, ``n`` on its free dims."""
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_relu_conv(**kw) -> onnx.ModelProto:
    return Chain(**kw).conv(8, outliers={2: 40.0}).relu().conv(6).build()


def depthwise_chain(multiplier: int = 1) -> onnx.ModelProto:
    """pointwise -> ReLU -> depthwise (with outlier channels) -> ReLU -> pointwise."""
    return (Chain(channels=4).conv(8, k=1).relu()
            .conv(8 * multiplier, k=3, group=8, outliers={1: 300.0, 5: 150.0}).relu()
            .conv(6, k=1).build())


def mobileone_like(seed: int = 0) -> onnx.ModelProto:
    """A MobileOne-style deploy chain: stem, depthwise/pointwise pairs with |w| in the
    hundreds on a few depthwise channels, GAP -> Flatten -> Gemm classifier."""
    c = Chain(channels=1, hw=(16, 16), seed=seed).conv(16, stride=2).relu()
    c.conv(16, group=16, outliers={3: 400.0, 11: 250.0}).relu().conv(32, k=1).relu()
    c.conv(32, group=32, stride=2, outliers={7: 600.0}).relu().conv(32, k=1).relu()
    c.conv(32, group=32, outliers={0: 200.0, 30: 350.0}).relu().conv(64, k=1).relu()
    return c.gap().flatten().gemm(10).build()


def perturbed(model: onnx.ModelProto, factor: float = 1.01) -> onnx.ModelProto:
    """A copy of ``model`` whose second-to-last initializer is scaled by ``factor``: a model
    that is no longer equivalent (for checks that must fail)."""
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = other.graph.initializer[-2]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * factor, w.name))
    return other
