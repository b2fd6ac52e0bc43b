"""The pass contract.

A pass is called on a ``ModelProto`` and *mutates it in place*, returning a
:class:`PassResult` that lists what it changed and what it skipped and why. Public API
functions copy their input once before running passes, so callers never see their model
mutated. ``contract`` states what a pass promises about the model's function, and therefore
how it is verified.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import onnx


class Contract(enum.Enum):
    EQUIVALENT = "equivalent"  # same function on every input, up to float rounding
    EQUIVALENT_ON_DATA = "equivalent on calibration data"  # exact where the statistics hold
    APPROXIMATE = "approximate"  # changes the function on purpose (e.g. bias correction)


@dataclass(frozen=True)
class Change:
    """Something a pass did, e.g. ``Change("equalized", ("conv1", "conv2"), "max |log s| 2.1")``."""

    kind: str
    nodes: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True)
class Skip:
    """A place a pass looked at and left alone, with the reason."""

    node: str
    reason: str


@dataclass
class PassResult:
    model: onnx.ModelProto
    changes: list[Change] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changes)


class Pass:
    """Base class: subclasses set ``name`` and ``contract`` and implement ``call``."""

    name: str = "pass"
    contract: Contract = Contract.EQUIVALENT

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.call(model)

    def call(self, model: onnx.ModelProto) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError
