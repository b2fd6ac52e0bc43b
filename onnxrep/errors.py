"""Typed exceptions. The CLI turns each into one line and an exit code."""


class OnnxrepError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class InputError(OnnxrepError):
    """Bad usage or bad input: missing, empty, truncated or non-ONNX file, bad paths."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The model is valid ONNX but uses something onnxrep cannot handle (opset, op, shape)."""


class DataError(InputError):
    """Calibration or evaluation data that does not match the model's inputs."""


class VerificationError(OnnxrepError):
    """A pass that claims equivalence changed the model's outputs beyond tolerance."""

    exit_code = 3

    def __init__(self, message: str, comparison=None):
        super().__init__(message)
        self.comparison = comparison
