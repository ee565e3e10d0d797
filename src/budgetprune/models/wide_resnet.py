"""Wide residual networks: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

WRN-``depth``-``width``: a 3×3 stem to 16 channels, three stages of n = (depth - 4) / 6
pre-activation blocks with 16k/32k/64k channels (k = ``width``; stride 2 at the start of
stages 2 and 3), then BN-ReLU, global average pooling and ``fc``. BAR (Lemaire et al.,
CVPR 2019) prunes WRN-16-12 on CIFAR, the default here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .registry import register_model
from .resnet import conv1x1, conv3x3, init_weights


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3, plus the shortcut.

    When the shape changes the shortcut is a 1×1 conv of the pre-activated input (as in the
    paper's code); otherwise it is the block's raw input.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = conv1x1(inplanes, planes, stride) if stride != 1 or inplanes != planes else None

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        identity = x if self.shortcut is None else self.shortcut(act)
        return out + identity


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` (``conv1``, ``layer1``..``layer3``, ``bn``, ``relu``, ``avgpool``, ``fc``)."""

    def __init__(self, depth: int = 16, width: int = 12, in_channels: int = 3, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"wrn width must be a positive integer, got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"wrn dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = conv3x3(in_channels, 16)
        inplanes = 16
        for i, planes in enumerate(widths):
            blocks = [WideBasicBlock(inplanes if j == 0 else planes, planes, 2 if i and not j else 1, dropout)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

        init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register_model
def wrn(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """Wide-ResNet WRN-``depth``-``width``; options ``depth=16`` (6n+4), ``width=12``, ``dropout=0``."""
    return WideResNet(in_channels=in_channels, num_classes=num_classes, **kw)
