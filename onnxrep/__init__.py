"""onnxrep: make re-parameterized CNNs quantize well (CLE, BN restore, PTQ, QAT on ONNX)."""

from onnxrep.calibration import Dataset, ImageOptions, load_data
from onnxrep.errors import (DataError, InputError, OnnxrepError, UnsupportedModelError,
                            VerificationError)
from onnxrep.model import load, save
from onnxrep.optimize import OptimizeConfig, optimize, optimize_with_details
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.evaluate import EvalResult, evaluate
from onnxrep.verify import compare

__all__ = [
    "DataError", "Dataset", "EqualizeConfig", "EqualizeCrossLayer", "EvalResult", "ImageOptions",
    "InputError", "OnnxrepError", "OptimizeConfig", "UnsupportedModelError", "VerificationError",
    "compare", "evaluate", "load", "load_data", "optimize", "optimize_with_details", "save",
]
