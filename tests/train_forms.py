"""Train forms of re-parameterizable blocks as torch modules, randomized and exported to ONNX.

Each module follows its paper's reference code (eval mode: BatchNorm uses running
statistics). ``randomize`` draws every weight and every BN statistic and affine parameter from a
seeded generator, so a merge that used the wrong mean, variance or gamma shows. ``export``
writes the classic (TorchScript) export: in eval mode torch folds each Conv -> BN pair into the
Conv, so BatchNormalization nodes remain only where nothing precedes them (identity branches,
BNs after a sum); ``keep_bn=True`` keeps every BN (``TrainingMode.PRESERVE``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random conv weights/biases and BN statistics (mean, var) and affine (gamma,
    beta; gamma of either sign); returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.05)
            sign = torch.where(torch.rand(n, generator=g) < 0.15, -1.0, 1.0)
            m.weight.copy_(sign * (torch.rand(n, generator=g) * 1.5 + 0.25))
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for p in module.parameters():  # LearnableAffine scalars
        if p.ndim == 1 and p.numel() == 1:
            p.copy_(torch.rand(1, generator=g) + 0.5)
    return module.eval()


def export(module: nn.Module, shape: tuple, path: str | Path, *, keep_bn: bool = False,
           opset: int = 17) -> onnx.ModelProto:
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.zeros(shape), str(path), dynamo=False,
                          opset_version=opset, training=mode, input_names=["input"],
                          output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return onnx.load(str(path))


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, padding=None):
        super().__init__()
        pad = tuple(s // 2 for s in k) if isinstance(k, tuple) else k // 2
        self.conv = nn.Conv2d(cin, cout, k, stride, pad if padding is None else padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class ACBlock(nn.Module):
    """ACNet (Ding et al. 2019): 3x3 + 1x3 + 3x1, each with BN, summed."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.square = ConvBN(cin, cout, (3, 3), stride)
        self.hor = ConvBN(cin, cout, (1, 3), stride)
        self.ver = ConvBN(cin, cout, (3, 1), stride)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class QARepVGGBlock(nn.Module):
    """QARepVGG (Chu et al. 2022; YOLOv6's QARepVGGBlock): 3x3 conv+BN + 1x1 conv without BN
    + identity, BN after the sum, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.rbr_dense = ConvBN(c, c, 3)
        self.rbr_1x1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.rbr_dense(x) + self.rbr_1x1(x) + x))


class RepDW(nn.Module):
    """RepViT's RepVGGDW / PP-LCNetV4 RepDWConv: depthwise 3x3+BN + depthwise 1x1 (+BN, or
    with a bias as in RepViT) + identity, then BN."""

    def __init__(self, c, bn1=True):
        super().__init__()
        self.conv = ConvBN(c, c, 3, groups=c)
        self.conv1 = ConvBN(c, c, 1, groups=c) if bn1 else nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then pad with the BN's own output at a zero input (its shift).
    DBB writes the border by slice assignment, which torch exports as a ScatterND chain; this
    is the same function as Sub -> Pad(0) -> Add."""

    def __init__(self, c, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        shift = shift.detach().view(1, -1, 1, 1)
        return F.pad(out - shift, [self.pad] * 4) + shift


class DBB(nn.Module):
    """Diverse Branch Block (Ding et al. 2021): kxk+BN, 1x1+BN, 1x1 -> BNAndPad -> AvgPool ->
    BN, 1x1 -> BNAndPad -> kxk (no pad) -> BN."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__()
        pad = k // 2
        self.dbb_origin = ConvBN(cin, cout, k, stride, groups)
        self.dbb_1x1 = ConvBN(cin, cout, 1, stride, groups)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg_pad = BNAndPad(cout, pad)
        self.avg = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = nn.BatchNorm2d(cout)
        self.idconv1 = nn.Conv2d(cin, cin, 1, groups=groups, bias=False)
        self.bn1 = BNAndPad(cin, pad)
        self.conv2 = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dbb_origin(x) + self.dbb_1x1(x)
        out = out + self.avg_bn(self.avg(self.avg_pad(self.avg_conv(x))))
        out = out + self.bn2(self.conv2(self.bn1(self.idconv1(x))))
        return self.act(out)


class DepthwiseAvgDBB(nn.Module):
    """DBB's depthwise variant: kxk+BN + AvgPool (padded, count_include_pad) + BN."""

    def __init__(self, c, k=3):
        super().__init__()
        self.dbb_origin = ConvBN(c, c, k, groups=c)
        self.avg = nn.AvgPool2d(k, 1, k // 2)
        self.avg_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.dbb_origin(x) + self.avg_bn(self.avg(x))


class LearnableAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * x + self.bias


class LearnableRepLayer(nn.Module):
    """PP-LCNetV3's LearnableRepLayer: identity BN + 1x1 ConvBN + several kxk ConvBN, summed
    from 0, a scalar learnable affine, then Hardswish and another learnable affine."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, num_conv_branches=2):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvBN(cin, cout, k, stride, groups)
                                       for _ in range(num_conv_branches)])
        self.conv_1x1 = ConvBN(cin, cout, 1, stride, groups) if k > 1 else None
        self.lab = LearnableAffine()
        self.act = nn.Hardswish()
        self.act_lab = LearnableAffine()

    def forward(self, x):
        out = 0
        if self.identity is not None:
            out += self.identity(x)
        if self.conv_1x1 is not None:
            out += self.conv_1x1(x)
        for conv in self.conv_kxk:
            out += conv(x)
        return self.act_lab(self.act(self.lab(out)))


def stack(*blocks: nn.Module) -> nn.Sequential:
    return nn.Sequential(*blocks)
