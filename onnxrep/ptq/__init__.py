"""Post-training quantization through onnxruntime's static quantizer (QDQ), with empirical
bias correction and a per-layer sensitivity report."""
