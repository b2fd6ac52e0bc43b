"""onnxrep: make re-parameterized CNNs quantize well (CLE, BN restore, PTQ, QAT on ONNX).

The public API is ``__all__``. ``qat``, ``qat_with_details`` and ``QATConfig`` need torch (the
``qat`` extra): they are imported on first use, so ``import onnxrep`` loads neither torch nor
matplotlib.
"""

from onnxrep.analysis.statistics import ChannelStats, Statistics, collect_statistics
from onnxrep.data import Dataset, ImageOptions, as_dataset, load_data
from onnxrep.errors import (DataError, InputError, OnnxrepError, UnsupportedModelError,
                            VerificationError)
from onnxrep.evaluation import EvalResult, evaluate
from onnxrep.ir.model import load, save
from onnxrep.passes.absorb_bias import AbsorbHighBias
from onnxrep.passes.dead_inputs import ZeroDeadInputs
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.passes.fold_affine import FoldAffine, FoldBatchNorm, fold_bn
from onnxrep.passes.reparameterize import Reparameterize, find_blocks, reparameterize
from onnxrep.passes.restore_bn import RestoreBatchNorm
from onnxrep.pipeline import OptimizeConfig, optimize, optimize_with_details, restore_bn
from onnxrep.ptq.quantizer import QuantizeConfig, quantize, quantize_with_details
from onnxrep.verify import compare

_LAZY = {"qat": "onnxrep.training.train", "qat_with_details": "onnxrep.training.train",
         "QATConfig": "onnxrep.training.train"}

__all__ = [
    "AbsorbHighBias", "ChannelStats", "DataError", "Dataset", "EqualizeConfig",
    "EqualizeCrossLayer", "EvalResult", "FoldAffine", "FoldBatchNorm", "ImageOptions",
    "InputError", "OnnxrepError", "OptimizeConfig", "QATConfig", "QuantizeConfig",
    "Reparameterize", "RestoreBatchNorm", "Statistics", "UnsupportedModelError",
    "VerificationError", "ZeroDeadInputs", "as_dataset", "collect_statistics", "compare",
    "evaluate", "find_blocks", "fold_bn", "load", "load_data", "optimize",
    "optimize_with_details", "qat", "qat_with_details", "quantize", "quantize_with_details",
    "reparameterize", "restore_bn", "save",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxrep' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
