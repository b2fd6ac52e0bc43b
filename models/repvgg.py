"""RepVGG (Ding et al., 2021), A0-style layout shrunk for 28x28 grayscale input.

Train form: every block is  ReLU( BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)] )
where the identity-BN branch exists only when in_channels == out_channels and
stride == 1.  Deploy form (after ``reparameterize()``): ReLU(conv3x3(x) + bias).

A0 uses a stem block followed by 4 stages with [2, 4, 14, 1] blocks, widths
(48, 96, 192, 1280) and stride 2 at the first block of each stage.  For 28x28
Fashion-MNIST the default here keeps the structure (stem + 4 stages, stride-2
downsampling in the first block of a stage) but with fewer blocks and narrower
widths so it trains on 2 CPU cores in minutes.
"""
from __future__ import annotations

import torch
from torch import nn

from ._fuse import ConvBN, RepClassifier, fuse_convbn, fuse_identity_bn, make_deploy_conv

# Default shrunk configuration (see models/README.md).
DEFAULT_CFG = dict(
    stem_width=16,        # A0: min(64, 64*0.75)=48, stride 2
    stem_stride=1,        # keep 28x28 resolution in the stem
    depths=(1, 2, 2, 1),  # A0: (2, 4, 14, 1)
    widths=(16, 32, 64, 96),  # A0: (48, 96, 192, 1280)
    strides=(2, 2, 2, 1),  # 28 -> 14 -> 7 -> 4 -> 4
)


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.rbr_dense = ConvBN(cin, cout, 3, stride)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cin) if (cin == cout and stride == 1) else None
        self.act = nn.ReLU()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = fuse_convbn(self.rbr_dense, 3)
        w1, b1 = fuse_convbn(self.rbr_1x1, 3)
        w, b = w + w1, b + b1
        if self.rbr_identity is not None:
            wi, bi = fuse_identity_bn(self.rbr_identity, groups=1, k=3)
            w, b = w + wi, b + bi
        self.reparam_conv = make_deploy_conv(self.rbr_dense.conv, w, b, 3)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.rbr_identity = None


class RepVGG(RepClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_width: int = 16,
                 stem_stride: int = 1, depths=(1, 2, 2, 1), widths=(16, 32, 64, 96),
                 strides=(2, 2, 2, 1)):
        super().__init__(RepVGGBlock(in_channels, stem_width, stem_stride), stem_width,
                         RepVGGBlock, depths, widths, strides, num_classes)


def repvgg_fmnist(**overrides) -> RepVGG:
    cfg = dict(DEFAULT_CFG)
    cfg.update(overrides)
    return RepVGG(num_classes=10, in_channels=1, **cfg)
