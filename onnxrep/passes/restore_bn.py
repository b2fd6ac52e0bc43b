"""Restore a BatchNormalization after each Conv from measured statistics (identity in function).

For a conv output y with exact per-channel mean m and variance v over the calibration data
(:mod:`onnxrep.analysis.statistics`, not a moving average), insert

    BN(y) = (y - m) / sqrt(v + eps) * gamma + beta,   gamma = sqrt(v + eps),  beta = m

so BN(y) = y: the inference graph computes the same function while the BN carries the
statistics a QAT or re-estimation step can use. gamma is sqrt(v + eps) rounded in the weight's
dtype, so onnxruntime's factor gamma / sqrt(v + eps) is 1 within an ulp (relative output error
~2e-7 on the shipped MobileOne). ``onnxrep fold-bn`` folds the BNs back. The contract is EQUIVALENT (the identity holds for every input); the statistics are
what depends on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxrep.analysis.statistics import Statistics
from onnxrep.errors import InputError
from onnxrep.ir.graph import GraphIndex, unique_name, is_onnx
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip


@dataclass(frozen=True)
class RestoreSummary:
    restored: int  # BatchNormalization nodes inserted
    samples: int  # calibration samples their statistics were measured on


class RestoreBatchNorm(Pass):
    """Insert a statistics-carrying identity BN after the selected Convs (default: all).

    ``stats`` must hold the per-channel statistics of each selected conv's output, for the
    model the pass is called on. ``layers``: node names (or ``Conv#i`` labels of unnamed
    nodes); an unknown name or a non-Conv raises :class:`InputError`."""

    name = "restore-bn"
    contract = Contract.EQUIVALENT

    def __init__(self, stats: Statistics, layers: list[str] | None = None, eps: float = 1e-5):
        if not eps > 0:
            raise InputError(f"eps must be positive, not {eps}")
        self.stats, self.layers, self.eps = stats, layers, eps

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        index = GraphIndex(graph)
        selected = select_convs(model, self.layers, index)
        changes, skips, inserts = [], [], []
        taken = set(index.producer) | set(index.initializers) | index.graph_inputs
        for i in selected:
            node, label = index.node(i), index.labels[i]
            y = node.output[0]
            reason = _problem(index, i, self.stats)
            if reason:
                skips.append(Skip(label, reason))
                continue
            s = self.stats[y]
            pre = unique_name(f"{y}_prebn", taken)
            params = _bn_params(s, self.eps, _dtype(index, node))
            names = [unique_name(f"{label}_bn_{p}", taken)
                     for p in ("scale", "bias", "mean", "var")]
            graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(params, names))
            node.output[0] = pre
            bn = helper.make_node("BatchNormalization", [pre, *names], [y],
                                  name=unique_name(f"{label}_bn", taken), epsilon=self.eps)
            inserts.append((i, bn))
            dead = int(np.sum(s.var == 0))
            changes.append(Change("restored", (label,), f"{s.channels} channels, std in "
                                  f"[{s.std.min():.3g}, {s.std.max():.3g}]"
                                  + (f", {dead} constant" if dead else "")))
        for i, bn in sorted(inserts, key=lambda p: -p[0]):
            graph.node.insert(i + 1, bn)
        return PassResult(model, changes, skips,
                          RestoreSummary(len(inserts), self.stats.samples))


def select_convs(model: onnx.ModelProto, layers: list[str] | None,
                 index: GraphIndex | None = None) -> list[int]:
    """Node indices of the named Convs, or of every Conv when ``layers`` is None."""
    index = index or GraphIndex(model.graph)
    convs = [i for i, n in enumerate(model.graph.node)
             if n.op_type == "Conv" and is_onnx(n)]
    if layers is None:
        return convs
    by_label = {index.labels[i]: i for i in range(len(model.graph.node))}
    chosen = []
    for name in layers:
        if name not in by_label:
            raise InputError(f"no node named '{name}' (Conv nodes: "
                             f"{_preview([index.labels[i] for i in convs])})", option="layers")
        i = by_label[name]
        if model.graph.node[i].op_type != "Conv":
            raise InputError(f"'{name}' is a {model.graph.node[i].op_type}, not a Conv",
                             option="layers")
        chosen.append(i)
    return sorted(set(chosen))


def _preview(names: list[str], limit: int = 8) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def _problem(index: GraphIndex, i: int, stats: Statistics) -> str | None:
    y = index.node(i).output[0]
    readers = [index.node(r) for r in index.readers(y)]
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization":
        return "already followed by a BatchNormalization"
    if y not in stats:
        why = stats.skipped.get(y, "not measured")
        return f"no statistics for its output '{y}': {why}"
    return None


def _dtype(index: GraphIndex, node: onnx.NodeProto) -> np.dtype:
    w = index.const(node.input[1]) if len(node.input) > 1 else None
    return w.dtype if w is not None and np.issubdtype(w.dtype, np.floating) else np.dtype(
        np.float32)


def _bn_params(s, eps: float, dtype: np.dtype) -> list[np.ndarray]:
    """scale = sqrt(var + eps) rounded as onnxruntime computes it in ``dtype``; bias = mean."""
    var = s.var.astype(dtype)
    scale = np.sqrt(var + dtype.type(eps)).astype(dtype)
    mean = s.mean.astype(dtype)
    return [scale, mean, mean.copy(), var]
