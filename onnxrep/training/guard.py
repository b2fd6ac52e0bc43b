"""Keep the better of the QAT export and the PTQ model training started from.

QAT with distillation trains the fake-quant model towards the FP32 model's outputs, per output
by its normalized error (:mod:`onnxrep.training.distill`); a short run on a handful of samples
can still end further from FP32 than where it began. So both INT8 models run in onnxruntime
over the calibration data (never trained on when it is given separately) and are scored by the
same quantity training lowers, the normalized mean squared error averaged over the outputs,

    e = mean_k  sum (y_k - q_k)^2 / sum y_k^2        score = -10 log10 e  (dB),

where y_k is the FP32 model's output k and q_k the INT8 model's. The export is kept when its
score is not below the PTQ model's; otherwise the PTQ model is returned and the reason is
reported. With one output the score is that output's SQNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from onnxrep import verify
from onnxrep.verify.streaming import compare_on_data
from onnxrep.data.readers import Dataset
from onnxrep.progress import log


@dataclass(frozen=True)
class Choice:
    """``kept``: "qat" or "ptq"; ``qat_db``/``ptq_db``: their scores (dB) on ``samples``."""

    kept: str
    qat_db: float
    ptq_db: float
    samples: int

    def summary(self) -> str:
        scores = (f"{self.qat_db:.2f} dB QAT vs {self.ptq_db:.2f} dB for the PTQ model it "
                  f"started from (output SQNR vs FP32, mean over outputs, {self.samples} "
                  "calibration samples)")
        if self.kept == "qat":
            return f"kept the QAT model: {scores}"
        return (f"wrote the PTQ model instead: QAT ended below it, {scores}; a lower --lr or "
                "more training data may help")

    def as_dict(self) -> dict:
        return {"kept": self.kept, "qat_db": self.qat_db, "ptq_db": self.ptq_db,
                "samples": self.samples}


def score_db(comparison: verify.Comparison) -> float:
    """-10 log10 of the outputs' mean normalized squared error (see the module docstring)."""
    errors = [10 ** (-m.sqnr_db / 10) for m in comparison.outputs.values()]
    if not errors:
        return math.inf
    mean = sum(errors) / len(errors)
    return math.inf if mean == 0 else -10 * math.log10(mean)


def keep_better(reference: onnx.ModelProto, qat: onnx.ModelProto, ptq: onnx.ModelProto,
                data: Dataset) -> tuple[onnx.ModelProto, Choice]:
    """(the better model, the record); ``reference`` is the FP32 model both approximate."""
    log("qat: scoring the QAT and the PTQ model against FP32 on the calibration data")
    ref = verify.session(reference, optimized=True)
    recorded = [verify.run(ref, feeds) for feeds in data.batches()]
    del ref
    scores = [score_db(compare_on_data(reference, m, data, recorded=recorded))
              for m in (qat, ptq)]
    choice = Choice("qat" if scores[0] >= scores[1] else "ptq", scores[0], scores[1],
                    data.num_samples or sum(len(next(iter(r.values()))) for r in recorded))
    return (qat if choice.kept == "qat" else ptq), choice
