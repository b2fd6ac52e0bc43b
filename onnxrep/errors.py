"""Typed exceptions. The CLI turns each into one line and an exit code.

Library messages speak of the model and the API; ``option`` names the parameter an error is
about (``"exclude"``, ``"input_shapes"``, ...), so each command can name its own flag for it.
"""

from __future__ import annotations


class OnnxrepError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option


class InputError(OnnxrepError):
    """Bad usage or bad input: missing, empty, truncated or non-ONNX file, bad paths."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The model is valid ONNX but uses something onnxrep cannot handle (opset, op, shape)."""


class DataError(InputError):
    """Calibration or evaluation data that does not match the model's inputs."""


class VerificationError(OnnxrepError):
    """A pass that claims equivalence changed the model's outputs beyond tolerance.
    ``needed``: the relative tolerance (a power of ten) that would have passed, when known."""

    exit_code = 3

    def __init__(self, message: str, comparison=None, *, needed: float | None = None):
        super().__init__(message, option="rtol" if needed is not None else None)
        self.comparison = comparison
        self.needed = needed


class TrainingDivergedError(OnnxrepError):
    """QAT's loss or gradients became non-finite: the parameters are left as they were before
    that step (the usual cure is a lower learning rate)."""

    exit_code = 3
