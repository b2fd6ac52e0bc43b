"""High-bias absorption (Nagel et al. 2019, arXiv 1906.04721, section 4.2.1), from statistics.

For layer1 -> Relu -> layer2, let z = W1 x + b1 be layer1's output. Where a channel stays
positive over the calibration data (measured min m_c > 0), Relu is the identity on it, so with
c = max(0, m) per channel:

    Relu(z - c) = Relu(z) - c                       (on the data)
    W2 (Relu(z) - c) + b2 = W2 Relu(z) + b2 - W2 c

and  b1' = b1 - c,  b2' = b2 + sum over W2's kernel taps of W2[o, i, ...] * c_i  (i over the
input channels of o's group; for a Gemm after Flatten, over c's H*W features, times alpha)
leave layer2's output unchanged on the data while the activation range shrinks by c. Max and
global pooling commute with subtracting a per-channel constant and may sit between Relu and
layer2 (a Flatten too, before a Gemm).

layer2 must not pad: a padded border reads 0, not -c, so its output would change at the border
pixels. Contract: EQUIVALENT_ON_DATA; a sample whose
pre-activation falls below the calibration minimum sees its activation clipped at c instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnxrep.analysis.statistics import Statistics
from onnxrep.ir.graph import GraphIndex, attr, is_onnx
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip
from onnxrep.ir.layers import add_to_bias, flatten_features, in_channels, padding
from onnxrep.ir.shapes import infer_shapes

SHIFT_OPS = {"MaxPool", "GlobalMaxPool", "GlobalAveragePool", "Identity", "Dropout"}
_MIN_SHIFT = 1e-6  # relative to the channel's max: smaller minima are rounding, not bias


@dataclass(frozen=True)
class AbsorbSummary:
    channels: int  # channels whose bias was absorbed into the next layer


class AbsorbHighBias(Pass):
    """``stats`` must hold the statistics of each first layer's output in the model passed."""

    name = "absorb-bias"
    contract = Contract.EQUIVALENT_ON_DATA

    def __init__(self, stats: Statistics):
        self.stats = stats

    def call(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model.graph)
        shapes = None
        changes, skips = [], []
        absorbed = 0
        for i, node in enumerate(model.graph.node):
            if node.op_type not in ("Conv", "Gemm") or not is_onnx(node):
                continue
            label = index.labels[i]
            found = _follow(index, i)
            if isinstance(found, str):
                if found:
                    skips.append(Skip(label, found))
                continue
            second, hw_needed = found
            if hw_needed and shapes is None:
                shapes = infer_shapes(model)
            features = _features(index, i, shapes) if hw_needed else 1
            reason = _problem(index, i, second, self.stats, features)
            if reason:
                skips.append(Skip(label, reason))
                continue
            held = self.held(label)
            if held:
                skips.append(held)
                continue
            s = self.stats[node.output[0]]
            c = np.where(s.min > _MIN_SHIFT * np.abs(s.max), s.min, 0.0)
            if not c.any():
                skips.append(Skip(label, "no channel stays positive over the data"))
                continue
            add_to_bias(index, index.node(i), -c)
            _compensate(index, second, c, features)
            absorbed += int((c > 0).sum())
            changes.append(Change("absorbed", (label, index.labels[second]),
                                  f"{int((c > 0).sum())}/{c.size} channels, c up to "
                                  f"{c.max():.3g} (max activation {s.max.max():.3g})"))
        return PassResult(model, changes, skips, AbsorbSummary(absorbed))


def _follow(index: GraphIndex, first: int) -> tuple[int, bool] | str:
    """(second layer, whether a Flatten sits between) or why there is none ("" when the
    layer is simply not followed by a Relu, which is not worth a message)."""
    tensor = index.node(first).output[0]
    readers = index.readers(tensor)
    if len(readers) != 1 or index.node(readers[0]).op_type != "Relu":
        return ""
    if tensor in index.graph_outputs:
        return f"its output '{tensor}' is a graph output"
    tensor = index.node(readers[0]).output[0]
    flat = False
    while True:
        readers = index.readers(tensor)
        if tensor in index.graph_outputs:
            return f"'{tensor}' is a graph output"
        if len(readers) != 1:
            return (f"'{tensor}' is read by {len(readers)} nodes; each would need the "
                    "compensation" if readers else f"'{tensor}' is not used")
        node = index.node(readers[0])
        label = f"{node.op_type} '{index.labels[readers[0]]}'"
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            return readers[0], flat
        if node.op_type in ("Flatten", "Reshape") and not flat:
            flat = True
        elif node.op_type not in SHIFT_OPS or (flat and node.op_type not in
                                               ("Identity", "Dropout")):
            return f"{label} follows the Relu; only pooling and Flatten commute with the shift"
        if any(out and index.readers(out) for out in node.output[1:]):
            return f"{label}: its second output is used"
        tensor = node.output[0]


def _features(index: GraphIndex, first: int, shapes: dict) -> int | None:
    """H*W features per channel where a Flatten reaches layer2 (the shape entering it)."""
    tensor = index.node(first).output[0]
    while True:
        node = index.node(index.readers(tensor)[0])
        if node.op_type in ("Flatten", "Reshape"):
            return flatten_features(node, tensor, shapes)[0]
        tensor = node.output[0]


def _problem(index: GraphIndex, first: int, second: int, stats: Statistics,
             features: int | None) -> str | None:
    n1, n2 = index.node(first), index.node(second)
    label2 = f"{n2.op_type} '{index.labels[second]}'"
    z = n1.output[0]
    if z not in stats:
        return f"no statistics for its output '{z}': {stats.skipped.get(z, 'not measured')}"
    problem = _bias_problem(index, n1)
    if problem:
        return problem
    if n2.op_type == "MatMul":
        return f"{label2} has no bias to absorb into"
    if len(n2.input) < 2 or not index.is_const(n2.input[1]):
        return f"the weight of {label2} is not a constant"
    if index.shared(n2.input[1]):
        return f"the weight of {label2} is shared by {len(index.readers(n2.input[1]))} nodes"
    problem = _bias_problem(index, n2)
    if problem:
        return f"{label2}: {problem}"
    w2 = index.const(n2.input[1])
    if n2.op_type == "Conv":
        what = padding(n2)
        if what:
            return (f"{label2} pads its input ({what}): border pixels would read 0 instead of "
                    "-c and change")
        if in_channels(n2, w2.shape) != stats[z].channels:
            return f"{label2} reads {in_channels(n2, w2.shape)} channels, " \
                   f"not {stats[z].channels}"
        return None
    if attr(n2, "transA", 0):
        return f"{label2} has transA=1"
    if features is None:
        return f"the Flatten before {label2} has no static [N, C*H*W] shape"
    k = w2.shape[1] if attr(n2, "transB", 0) else w2.shape[0]
    if k != stats[z].channels * features:
        return f"{label2} reads {k} features, not {stats[z].channels} x {features}"
    return None


def _bias_problem(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    name = node.input[2]
    if not index.is_const(name):
        return f"bias '{name}' is not a constant"
    if index.shared(name):
        return f"bias '{name}' is shared by {len(index.readers(name))} nodes"
    if node.op_type == "Gemm" and index.const(name).ndim == 2 and index.const(name).shape[0] > 1:
        return f"Gemm bias '{name}' differs per row"
    return None


def _compensate(index: GraphIndex, second: int, c: np.ndarray, features: int) -> None:
    node = index.node(second)
    w = index.const(node.input[1]).astype(np.float64)
    if node.op_type == "Conv":
        g = int(attr(node, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        taps = w.reshape(g, cout // g, cin_g, -1).sum(axis=3)
        delta = np.einsum("goj,gj->go", taps, c.reshape(g, cin_g)).reshape(cout)
    else:
        wk = w.T if attr(node, "transB", 0) else w  # [K, N]
        delta = float(attr(node, "alpha", 1.0)) * (np.repeat(c, features) @ wk)
    add_to_bias(index, node, delta)
