"""MobileOne (Vasu et al., 2023), S0-style layout shrunk for 28x28 grayscale input.

A MobileOne *block* (as in the paper / Apple's reference code) is
  depthwise unit:  ReLU( sum_k BN(dwconv3x3_k(x)) + BN(dwconv1x1(x)) [+ BN(x)] )
  pointwise unit:  ReLU( sum_k BN(conv1x1_k(x)) [+ BN(x)] )
with k over-parameterized branches (k = 4 for S0).  The identity BN exists when
in == out channels and stride == 1.  After ``reparameterize()`` each unit is a
single conv with bias (the depthwise unit stays depthwise, groups=channels).

S0 uses a stem unit (dense 3x3, stride 2) followed by 4 stages with
[2, 8, 10, 1] blocks and widths (48, 128, 256, 1024), stride 2 at the first
block of each stage.  The default here keeps that structure with fewer blocks,
narrower widths and a stride-1 stem for 28x28 input.
"""
from __future__ import annotations

import torch
from torch import nn

from ._fuse import ConvBN, RepClassifier, fuse_convbn, fuse_identity_bn, make_deploy_conv

DEFAULT_CFG = dict(
    stem_width=16,         # S0: 48, stride 2
    stem_stride=1,
    depths=(1, 2, 2, 1),   # S0: (2, 8, 10, 1)
    widths=(16, 32, 64, 96),  # S0: (48, 128, 256, 1024)
    strides=(2, 2, 2, 1),  # 28 -> 14 -> 7 -> 4 -> 4
    num_branches=4,        # S0: k = 4
)


class MobileOneUnit(nn.Module):
    """One re-parameterizable conv unit (depthwise kxk, pointwise 1x1 or the dense stem)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, num_branches: int = 4):
        super().__init__()
        self.kernel_size, self.groups = kernel_size, groups
        self.rbr_conv = nn.ModuleList(
            [ConvBN(cin, cout, kernel_size, stride, groups) for _ in range(num_branches)]
        )
        self.rbr_scale = ConvBN(cin, cout, 1, stride, groups) if kernel_size > 1 else None
        self.rbr_skip = nn.BatchNorm2d(cin) if (cin == cout and stride == 1) else None
        self.act = nn.ReLU()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        y = 0
        if self.rbr_skip is not None:
            y = self.rbr_skip(x)
        if self.rbr_scale is not None:
            y = y + self.rbr_scale(x)
        for branch in self.rbr_conv:
            y = y + branch(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        k = self.kernel_size
        w = b = 0
        for branch in self.rbr_conv:
            wi, bi = fuse_convbn(branch, k)
            w, b = w + wi, b + bi
        if self.rbr_scale is not None:
            wi, bi = fuse_convbn(self.rbr_scale, k)
            w, b = w + wi, b + bi
        if self.rbr_skip is not None:
            wi, bi = fuse_identity_bn(self.rbr_skip, groups=self.groups, k=k)
            w, b = w + wi, b + bi
        self.reparam_conv = make_deploy_conv(self.rbr_conv[0].conv, w, b, k)
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.rbr_scale = self.rbr_skip = None


class MobileOneBlock(nn.Module):
    """Depthwise 3x3 unit (carries the stride) followed by a pointwise 1x1 unit."""

    def __init__(self, cin: int, cout: int, stride: int = 1, num_branches: int = 4):
        super().__init__()
        self.dw = MobileOneUnit(cin, cin, 3, stride, groups=cin, num_branches=num_branches)
        self.pw = MobileOneUnit(cin, cout, 1, 1, groups=1, num_branches=num_branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileOne(RepClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_width: int = 16,
                 stem_stride: int = 1, depths=(1, 2, 2, 1), widths=(16, 32, 64, 96),
                 strides=(2, 2, 2, 1), num_branches: int = 4):
        # As in the reference S0 code the stem is a dense 3x3 unit with a single conv branch.
        stem = MobileOneUnit(in_channels, stem_width, 3, stem_stride, groups=1, num_branches=1)
        super().__init__(stem, stem_width,
                         lambda cin, cout, stride: MobileOneBlock(cin, cout, stride, num_branches),
                         depths, widths, strides, num_classes)


def mobileone_fmnist(**overrides) -> MobileOne:
    cfg = dict(DEFAULT_CFG)
    cfg.update(overrides)
    return MobileOne(num_classes=10, in_channels=1, **cfg)
