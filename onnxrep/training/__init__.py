"""Quantization-aware training through a torch round-trip: ONNX -> torch (``convert``), fake
quantization (``fake_quant``), training (``train``) and QDQ export (``export``). The only part
of onnxrep that imports torch (the ``qat`` extra)."""
