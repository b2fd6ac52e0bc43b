"""Post-training quantization to QDQ INT8 (ptq), per-layer error report (sensitivity) and
empirical bias correction (bias_correction)."""

from onnxrep.quantize.bias_correction import BiasCorrection, correct_biases
from onnxrep.quantize.ptq import (Quantized, QuantizeConfig, prepare, quantize,
                                  quantize_with_details)
from onnxrep.quantize.sensitivity import LayerError, LayerReport, layer_report

__all__ = ["BiasCorrection", "LayerError", "LayerReport", "QuantizeConfig", "Quantized",
           "correct_biases", "layer_report", "prepare", "quantize", "quantize_with_details"]
