"""onnxrep: make re-parameterized CNNs quantize well (CLE, BN restore, PTQ, QAT on ONNX)."""

from onnxrep.calibration import Dataset, ImageOptions, load_data
from onnxrep.calibration.statistics import ChannelStats, Statistics, collect_statistics
from onnxrep.errors import (DataError, InputError, OnnxrepError, UnsupportedModelError,
                            VerificationError)
from onnxrep.model import load, save
from onnxrep.optimize import OptimizeConfig, optimize, optimize_with_details
from onnxrep.passes.absorb_bias import AbsorbHighBias
from onnxrep.passes.dead_channels import ZeroDeadInputs
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from onnxrep.passes.fold_batchnorm import FoldBatchNorm, fold_bn
from onnxrep.passes.reparameterize import Reparameterize, find_blocks, reparameterize
from onnxrep.passes.restore_batchnorm import RestoreBatchNorm, restore_bn
from onnxrep.evaluate import EvalResult, evaluate
from onnxrep.quantize.ptq import QuantizeConfig, quantize
from onnxrep.verify import compare

__all__ = [
    "AbsorbHighBias", "ChannelStats", "FoldBatchNorm", "RestoreBatchNorm", "Statistics",
    "ZeroDeadInputs", "collect_statistics", "fold_bn", "restore_bn",
    "Reparameterize", "find_blocks", "reparameterize",
    "DataError", "Dataset", "EqualizeConfig", "EqualizeCrossLayer", "EvalResult", "ImageOptions",
    "InputError", "OnnxrepError", "OptimizeConfig", "UnsupportedModelError", "VerificationError",
    "QuantizeConfig", "quantize", "compare", "evaluate", "load", "load_data", "optimize", "optimize_with_details", "save",
]


def __getattr__(name: str):
    """QAT needs torch; it is imported only when asked for, so ``import onnxrep`` stays light."""
    if name in ("qat", "qat_with_details", "QATConfig"):
        from onnxrep.quantize import qat as module

        return getattr(module, name)
    raise AttributeError(f"module 'onnxrep' has no attribute '{name}'")
