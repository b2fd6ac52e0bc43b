"""Comparison of two models over all of a dataset, streamed batch by batch.

:class:`Fidelity` keeps running sums behind :func:`onnxrep.verify.metrics`' definitions, so the
result over all batches equals the metrics of the concatenated outputs without holding them:
max |a - b|, max |reference| (the relative error's denominator, floored by the output's bound),
sum (a - b)^2 and sum a^2 (SQNR), sum a*b and sum b^2 (cosine), and top-1 agreement for [N, K]
outputs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx

from onnxrep.data import as_dataset
from onnxrep.errors import InputError
from onnxrep.progress import Progress
from onnxrep.verify import (Comparison, ModelLike, OutputMetrics, check, nonfinite,
                            output_bounds, run, session, sqnr_db)


def compare_on_data(reference: ModelLike, candidate: ModelLike, data, *,
                    rtol: float | None = None, what: str = "the pass",
                    recorded: list[dict] | None = None) -> Comparison:
    """Every output of both models (protos or paths) over all of ``data``;
    :class:`VerificationError` when ``rtol`` is given and exceeded. ``recorded``: the
    reference's outputs for the first batches of ``data`` (as a statistics run kept them);
    the reference model runs only on the batches they do not cover."""
    check = DataCheck(reference, data, rtol=rtol, what=what, recorded=recorded)
    cand_sess = session(candidate, optimized=True)
    with Progress(check.dataset.num_samples, "verifying on data") as bar:
        for feeds in check.dataset.batches():
            check.add(feeds, run(cand_sess, feeds))
            bar.update(len(next(iter(feeds.values()))))
    return check.finish()


class DataCheck:
    """:func:`compare_on_data` fed by whoever runs the candidate: ``add(feeds, outputs)`` for
    each batch of ``data`` in order (the candidate's outputs on it), then ``finish()``. A run
    that computes the candidate's outputs anyway (onnxruntime's calibrator does) thus checks it
    at no extra inference."""

    def __init__(self, reference: ModelLike, data, *, rtol: float | None, what: str,
                 recorded: list[dict] | None = None):
        self.reference, self.rtol, self.what = reference, rtol, what
        self.dataset = as_dataset(data, reference)
        ref_model = (reference if isinstance(reference, onnx.ModelProto) else
                     onnx.load(os.fspath(reference), load_external_data=False))
        self.names = [o.name for o in ref_model.graph.output]
        bounds = output_bounds(ref_model)
        self.sums = {name: Fidelity(bounds.get(name, 0.0)) for name in self.names}
        self.recorded, self._session = recorded or [], None
        self.batches = self.samples = 0

    def add(self, feeds: dict, outputs: dict) -> None:
        n = len(next(iter(feeds.values())))
        i, self.batches = self.batches, self.batches + 1
        ref = self.recorded[i] if i < len(self.recorded) else None
        if ref is None or set(ref) != set(self.names) or len(next(iter(ref.values()))) != n:
            self._session = self._session or session(self.reference, optimized=True)
            ref = run(self._session, feeds)
        for name, acc in self.sums.items():
            try:
                acc.update(ref[name], outputs[name], name)
            except InputError as exc:
                text = str(exc).replace("the reference model outputs",
                                        "the original model already outputs", 1)
                raise InputError(f"{text} of the calibration data; its outputs cannot be "
                                 "verified") from None
        self.samples += n

    def finish(self) -> Comparison:
        """The comparison; :class:`VerificationError` past ``rtol``."""
        self._session = None
        comparison = Comparison({name: acc.result() for name, acc in self.sums.items()})
        if self.rtol is not None:
            check(comparison, self.rtol, f"{self.what} (on {self.samples} calibration samples)")
        return comparison


class Fidelity:
    """Running sums behind verify.metrics' definitions, over all batches of one output."""

    def __init__(self, bound: float = 0.0):
        self.bound = bound
        self.max_abs = self.ref_max = self.noise = self.signal = self.dot = self.cand_sq = 0.0
        self.agree = self.rows = 0
        self.classifier = True

    def update(self, reference: np.ndarray, candidate: np.ndarray, name: str) -> None:
        ref, cand = _wide(reference), _wide(candidate)
        if ref.shape != cand.shape:
            raise InputError(f"output '{name}' has shape {cand.shape} in the model but "
                             f"{ref.shape} in the reference")
        if not np.isfinite(ref).all():  # nothing to measure against: an input problem
            raise InputError(f"the reference model outputs inf/NaN ({nonfinite({name: ref})}) "
                             f"on samples {self.rows}..{self.rows + len(ref) - 1}")
        # the difference in the outputs' own precision (exact where they nearly agree), every
        # sum accumulated in float64 without a float64 copy of the arrays
        with np.errstate(all="ignore"):
            diff = (ref - cand).ravel()
        if not np.isfinite(diff).all():
            diff[~np.isfinite(diff)] = np.inf  # a NaN error must not read as no error
        ref, cand = ref.ravel(), cand.ravel()
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.ref_max = max(self.ref_max, float(np.abs(ref).max(initial=0.0)))
        self.noise += _dot(diff, diff)
        self.signal += _dot(ref, ref)
        self.dot += _dot(ref, cand)
        self.cand_sq += _dot(cand, cand)
        reference = np.asarray(reference)
        self.classifier = self.classifier and reference.ndim == 2 and reference.shape[1] > 1
        if self.classifier:
            self.agree += int((reference.argmax(1) == np.asarray(candidate).argmax(1)).sum())
        self.rows += len(reference)

    def result(self) -> OutputMetrics:
        m = self.max_abs
        scale = max(self.ref_max, self.bound)
        rel = m / scale if scale > 0 else (0.0 if m == 0 else math.inf)
        sqnr = sqnr_db(self.signal, self.noise)
        norms = math.sqrt(self.signal) * math.sqrt(self.cand_sq)
        cosine = self.dot / norms if norms > 0 else float(m == 0)
        top1 = self.agree / self.rows if self.classifier and self.rows else None
        return OutputMetrics(m, rel, sqnr, cosine, top1)


def _wide(a) -> np.ndarray:
    """float32/float64 outputs as they are; narrower floats, integers and bools widened so
    that a difference neither wraps nor loses its digits."""
    a = np.asarray(a)
    if a.dtype in (np.float32, np.float64):
        return a
    return a.astype(np.float64)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) accumulated in float64 (an inf stays inf)."""
    with np.errstate(all="ignore"):
        return float(np.einsum("i,i->", a, b, dtype=np.float64))
