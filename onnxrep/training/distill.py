"""Distillation from the FP32 model when the training data has no labels.

The loss of each graph output follows from what it holds, read from the node that produces
it (``output_kinds``):

- **probabilities** (a Softmax, possibly behind Identity, as PP-OCR's classifiers and CTC
  recognizers end): KL(teacher || student) over the softmax axis on log-probabilities,
  averaged over every other position, so a recognizer's [N, T, C] gives the mean per-frame KL.
  Taking log_softmax of probabilities, as if they were logits, would compare two flattened
  distributions: over C = 18710 characters the gradient all but vanishes.
- **logits** [N, K] (any other 2-D output): KL of their softmaxes (temperature 1).
- **anything else** (a detector's Sigmoid map, box regressions, features): MSE normalized by
  the teacher output's mean square, ||s - t||^2 / ||t||^2 = 10^(-SQNR / 10). Outputs of
  different scales (a layout head's scores in [0, 1] beside box logits in the tens) then
  weigh alike, and the loss is the noise-to-signal ratio the SQNR figures report.

``Distill.MSE`` forces the normalized MSE on every output; ``Distill.KL`` forces KL and refuses
an output that is neither probabilities nor [N, K] logits (KL of a 1-channel map is 0).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import onnx
import torch
import torch.nn.functional as F

from onnxrep.errors import InputError
from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.ir.model import opset_version
from onnxrep.training.config import Distill


class Kind(enum.Enum):
    PROBABILITIES = "probabilities"
    LOGITS = "logits"
    OTHER = "other"


@dataclass(frozen=True)
class OutputKind:
    """What one graph output holds; ``axis``: the softmax axis of probabilities (may be
    negative), ``last_only``: opset < 13 Softmax, a distribution over ``axis`` only when it is
    the last axis (it normalizes over the flattened axes from ``axis`` on)."""

    name: str
    softmax_axis: int | None = None
    last_only: bool = False

    def kind(self, output: torch.Tensor) -> Kind:
        if self.softmax_axis is not None:
            axis = self.softmax_axis % output.ndim
            if not self.last_only or axis == output.ndim - 1:
                return Kind.PROBABILITIES
        return Kind.LOGITS if output.ndim == 2 else Kind.OTHER


def output_kinds(model: onnx.ModelProto) -> list[OutputKind]:
    """One :class:`OutputKind` per graph output, in graph-output order."""
    index = GraphIndex(model.graph)
    opset = opset_version(model)
    kinds = []
    def producer(tensor: str) -> onnx.NodeProto | None:
        i = index.producer.get(tensor)
        return None if i is None else model.graph.node[i]

    for out in model.graph.output:
        node = producer(out.name)
        while node is not None and node.op_type == "Identity":
            node = producer(node.input[0])
        if node is not None and node.op_type == "Softmax":
            axis = attr(node, "axis", -1 if opset >= 13 else 1)
            kinds.append(OutputKind(out.name, int(axis), last_only=opset < 13))
        else:
            kinds.append(OutputKind(out.name))
    return kinds


def distill_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 kinds: Sequence[OutputKind], forced: Distill | None = None) -> torch.Tensor:
    """The sum over floating-point outputs of each one's loss against the teacher's."""
    total = torch.zeros(())
    for s, t, k in zip(outputs, targets, kinds):
        if not s.is_floating_point():
            continue
        kind = k.kind(s)
        if forced is Distill.MSE or (forced is None and kind is Kind.OTHER):
            total = total + normalized_mse(s, t)
        elif kind is Kind.OTHER:
            raise InputError(f"--distill kl needs class scores, but output '{k.name}' "
                             f"{tuple(s.shape)} is neither a Softmax nor [N, K] logits; "
                             "use --distill mse", option="distill")
        elif kind is Kind.PROBABILITIES:
            total = total + kl_probabilities(s, t, k.softmax_axis % s.ndim)
        else:
            total = total + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1),
                                     reduction="batchmean", log_target=True)
    return total


def kl_probabilities(s: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean over positions of sum_c t_c (log t_c - log s_c); s clamped above 0 (a float32
    softmax underflows to exactly 0 where the teacher can still put mass)."""
    tiny = torch.finfo(s.dtype).tiny
    per = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(tiny))).sum(axis)
    return per.mean()


def normalized_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over the batch (plain MSE when the teacher output is all zero)."""
    power = t.pow(2).mean()
    error = (s - t).pow(2).mean()
    return error / power if float(power) > 0 else error
