"""Graph passes over ``onnx.ModelProto``; one pass family per module."""

from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip

__all__ = ["Change", "Contract", "Pass", "PassResult", "Skip"]
