"""Helpers shared by the RepVGG / MobileOne definitions: the classifier skeleton and the
re-parameterization arithmetic.

All fusion arithmetic is done in float64 and cast back to the parameter dtype at
the end, so the deploy form matches the train form (in eval mode) to within
float32 rounding.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (one branch of a re-param block)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double()
    beta = bn.bias.detach().double()
    t = gamma / torch.sqrt(var + bn.eps)
    return t, beta - mean * t


def fuse_kernel_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kernel', bias') in float64 such that bn(conv(x, kernel)) == conv(x, kernel') + bias'."""
    t, shift = _bn_scale_shift(bn)
    return kernel.detach().double() * t.reshape(-1, 1, 1, 1), shift


def fuse_convbn(branch: ConvBN, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse a ConvBN branch and zero-pad its kernel to k x k (centered)."""
    w, b = fuse_kernel_bn(branch.conv.weight, branch.bn)
    kb = w.shape[-1]
    if kb != k:
        p = (k - kb) // 2
        w = F.pad(w, [p, p, p, p])
    return w, b


def identity_kernel(channels: int, groups: int, k: int) -> torch.Tensor:
    """k x k (grouped) conv kernel implementing the identity map, float64."""
    in_per_group = channels // groups
    w = torch.zeros(channels, in_per_group, k, k, dtype=torch.float64)
    for c in range(channels):
        w[c, c % in_per_group, k // 2, k // 2] = 1.0
    return w


def fuse_identity_bn(bn: nn.BatchNorm2d, groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fuse_kernel_bn(identity_kernel(bn.num_features, groups, k), bn)


def make_deploy_conv(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, k: int) -> nn.Conv2d:
    """Build a biased conv with the geometry of `template` but kernel size k."""
    conv = nn.Conv2d(
        template.in_channels, template.out_channels, k,
        stride=template.stride, padding=k // 2, groups=template.groups, bias=True,
    )
    dtype = template.weight.dtype
    with torch.no_grad():
        conv.weight.copy_(weight.to(dtype))
        conv.bias.copy_(bias.to(dtype))
    return conv.to(template.weight.device)


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Call .reparameterize() on every block that has one (in place). Returns model in eval mode."""
    for m in list(model.modules()):
        if m is not model and hasattr(m, "reparameterize"):
            m.reparameterize()
    return model.eval()


class RepClassifier(nn.Module):
    """stem -> stages of blocks -> global average pool -> linear. ``block(cin, cout,
    stride)`` builds one block; the first block of a stage takes its stride."""

    def __init__(self, stem: nn.Module, stem_width: int, block, depths, widths, strides,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        stages, cin = [], stem_width
        for depth, width, stride in zip(depths, widths, strides):
            blocks = []
            for i in range(depth):
                blocks.append(block(cin, width, stride if i == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.linear(torch.flatten(self.gap(x), 1))

    def reparameterize(self) -> "RepClassifier":
        """Convert every block to the deploy form in place; returns self (eval mode)."""
        return reparameterize_model(self)
