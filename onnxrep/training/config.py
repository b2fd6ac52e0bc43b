"""What QAT is asked to do: plain dataclasses, importable without torch (``--help`` and
config validation need no torch)."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field

from onnxrep.ptq.targets import ONNXRUNTIME, TARGETS, Target, get_target


@dataclass(frozen=True)
class FakeQuantConfig:
    """``per_channel``: one weight scale per output channel (else per tensor);
    ``reduce_range``: 7-bit weights [-63, 63] (see the module docstring);
    ``averaging_constant``: EMA weight of a training batch's activation min/max (0: the
    calibrated ranges stay fixed);
    ``bn_momentum``: running-statistics momentum of fused BatchNorm in training;
    ``target``: the deployment profile whose activation codes, bias form and Q/DQ placement
    the fake quantization reproduces (:mod:`onnxrep.ptq.targets`)."""

    per_channel: bool = False
    reduce_range: bool = False
    averaging_constant: float = 0.01
    bn_momentum: float = 0.1
    target: Target = field(default=ONNXRUNTIME)

    def __post_init__(self):
        if not 0 <= self.averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in [0, 1], not {self.averaging_constant}")
        if not 0 <= self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in [0, 1], not {self.bn_momentum}")


OPTIMIZERS = ("sgd", "adam")


class Distill(enum.Enum):
    KL = "kl"
    MSE = "mse"


@dataclass(frozen=True)
class QATConfig:
    """How to train.

    ``lr``: peak learning rate (cosine decay to 0; Nesterov ``momentum`` for SGD).
    ``target``: the runtime the model is for ("onnxruntime", "openvino", "tensorrt" or a
    :class:`~onnxrep.ptq.targets.Target`): fake quantization and export place and round Q/DQ
    as ``onnxrep quantize --target`` does. ``per_channel``/``reduce_range``: weight
    quantization (:class:`FakeQuantConfig`); ``per_channel`` None takes the target's default.
    ``freeze_bn_after``: optimizer steps after which fused BNs use and keep their running
    statistics (default 0: from the first step, so a restored BN trains as a per-channel scale
    and shift of its conv; None: batch statistics throughout, which measured worse on every
    model tried: the README's QAT section). ``restore_bn``: insert BNs after Convs first (step 2).
    ``optimize``: :func:`onnxrep.optimize` first. ``from_ptq``: start from what
    ``onnxrep quantize`` (same target and weight granularity) makes of the model: its passes and
    its bias-corrected biases, so the first step trains the PTQ model. ``keep_better``: when
    distilling from a PTQ start, score the export and that PTQ model on the calibration data and
    write the better (:mod:`onnxrep.training.guard`). ``optimizer``: "adam" (AdamW, each
    tensor's learning rate ``lr`` times its RMS at the start: a relative step) or "sgd".
    ``averaging_constant``: 0 keeps the calibrated activation ranges fixed, else their
    exponential average per training batch. ``calib_samples``: training samples used for
    calibration when no calibration data is given. ``distill``: distillation loss without
    labels (None: per output by what it holds, :mod:`onnxrep.training.distill`).
    ``checkpoint_every``: also checkpoint every N steps (0: only at epoch ends). ``max_steps``:
    stop after this many steps in all (a checkpoint is written; the learning-rate schedule
    still spans all epochs). ``max_minutes``: also stop
    once the training loop has run this long (wall clock, checked after each step; checkpointed
    and exported like ``max_steps``). ``rtol``: torch vs onnxruntime tolerance of the
    conversion check.
    """

    epochs: int = 1
    optimizer: str = "adam"
    lr: float = 1e-5
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    target: str | Target = "onnxruntime"
    per_channel: bool | None = None
    reduce_range: bool = False
    restore_bn: bool = True
    optimize: bool = True
    from_ptq: bool = True
    keep_better: bool = True
    freeze_bn_after: int | None = 0
    calib_samples: int = 512
    distill: Distill | None = None
    averaging_constant: float = 0.0
    bn_momentum: float = 0.1
    seed: int = 0
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 0
    resume: bool = False
    max_steps: int | None = None
    max_minutes: float | None = None
    rtol: float = 1e-5

    def __post_init__(self):
        if not isinstance(self.target, Target) and self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.per_channel is None:
            object.__setattr__(self, "per_channel", self.profile.per_channel)
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.calib_samples < 1:
            problems.append("epochs, batch_size and calib_samples must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not "
                            f"{self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be positive, not {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            problems.append("momentum must be in [0, 1) and weight_decay >= 0")
        if self.freeze_bn_after is not None and self.freeze_bn_after < 0:
            problems.append("freeze_bn_after must be >= 0")
        if self.checkpoint_every < 0 or (self.max_steps is not None and self.max_steps < 1):
            problems.append("checkpoint_every must be >= 0 and max_steps >= 1")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes)
                                                 and self.max_minutes > 0):
            problems.append(f"max_minutes must be positive, not {self.max_minutes}")
        if self.resume and self.checkpoint_dir is None:
            problems.append("resume needs a checkpoint directory")
        if problems:
            raise ValueError("; ".join(problems))
        self.fake_quant()

    @property
    def profile(self) -> Target:
        """The deployment target's settings (:class:`onnxrep.ptq.targets.Target`)."""
        return get_target(self.target)

    def fake_quant(self) -> FakeQuantConfig:
        return FakeQuantConfig(self.per_channel, self.reduce_range, self.averaging_constant,
                               self.bn_momentum, self.profile)

    def fingerprint_fields(self) -> dict:
        """The fields a resumed checkpoint must match: every field but where and how often
        checkpoints go, whether to resume, where to stop and the conversion check's tolerance,
        so a new field invalidates old checkpoints by itself."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in _NOT_FINGERPRINTED}
        fields["target"] = self.profile.as_dict()  # no function addresses
        return fields


_NOT_FINGERPRINTED = ("checkpoint_dir", "checkpoint_every", "resume", "max_steps", "max_minutes",
                      "rtol")
