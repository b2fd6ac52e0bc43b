"""onnxrep: make re-parameterized CNNs quantize well (CLE, BN restore, PTQ, QAT on ONNX)."""

from onnxrep.errors import (DataError, InputError, OnnxrepError, UnsupportedModelError,
                            VerificationError)
from onnxrep.model import load, save
from onnxrep.optimize import OptimizeConfig, optimize, optimize_with_details
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.verify import compare

__all__ = [
    "DataError", "EqualizeConfig", "EqualizeCrossLayer", "InputError", "OnnxrepError",
    "OptimizeConfig", "UnsupportedModelError", "VerificationError", "compare", "load",
    "optimize", "optimize_with_details", "save",
]
