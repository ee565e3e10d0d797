"""Small test models with the connection patterns of larger families (13K-26K
parameters each, fast on CPU, for 28×28 or 32×32 inputs):

* ``tiny_densenet``: concatenation — Huang et al., "Densely Connected Convolutional
  Networks" (CVPR 2017).
* ``tiny_mobilenetv2``: depthwise convs and inverted residuals — Sandler et al.,
  "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018).
* ``tiny_senet``: channel-wise multiplication — Hu et al., "Squeeze-and-Excitation
  Networks" (CVPR 2018), on a small ResNet.

Layouts follow torchvision's ``DenseNet``, ``MobileNetV2`` and ``SqueezeExcitation``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model
from .resnet import BasicBlock, ResNet, conv1x1, conv3x3


# --- DenseNet ---------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-conv3×3 making ``growth`` new maps, concatenated to the input."""

    def __init__(self, inplanes: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.conv = conv3x3(inplanes, growth)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


def transition(inplanes: int, planes: int) -> nn.Sequential:
    """BN-ReLU-conv1×1-avgpool 2 between dense blocks."""
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(inplanes), relu=nn.ReLU(inplace=False),
                                     conv=conv1x1(inplanes, planes), pool=nn.AvgPool2d(2)))


class TinyDenseNet(nn.Module):
    """Stem conv, dense block, transition (halving the channels), dense block, BN-ReLU, pool, fc."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, stem: int = 16, growth: int = 8,
                 layers_per_block: int = 3):
        super().__init__()
        c = stem
        parts: list[tuple[str, nn.Module]] = [("conv0", conv3x3(in_channels, c))]
        for b in (1, 2):
            block = []
            for _ in range(layers_per_block):
                block.append(DenseLayer(c, growth))
                c += growth
            parts.append((f"denseblock{b}", nn.Sequential(*block)))
            if b == 1:
                parts.append(("transition1", transition(c, c // 2)))
                c //= 2
        parts += [("norm5", nn.BatchNorm2d(c)), ("relu5", nn.ReLU(inplace=False))]
        self.features = nn.Sequential(OrderedDict(parts))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- MobileNetV2 ------------------------------------------------------------------------------

class ConvBNReLU6(nn.Sequential):
    """conv (1×1, or 3×3 possibly depthwise)-BN-ReLU6, like torchvision's Conv2dNormActivation."""

    def __init__(self, inplanes: int, planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        conv = conv3x3(inplanes, planes, stride, groups) if kernel_size == 3 else conv1x1(inplanes, planes, stride)
        super().__init__(conv, nn.BatchNorm2d(planes), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """Expand 1×1 (if ``expand_ratio`` > 1), depthwise 3×3, linear project 1×1; residual add
    when the stride is 1 and the channels do not change."""

    def __init__(self, inplanes: int, planes: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inplanes * expand_ratio
        self.use_res_connect = stride == 1 and inplanes == planes
        layers: list[nn.Module] = [ConvBNReLU6(inplanes, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   conv1x1(hidden, planes), nn.BatchNorm2d(planes)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


#: (expand ratio t, output channels c, stride s) per block; the stem keeps full resolution.
TINY_MOBILENETV2 = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2))


class TinyMobileNetV2(nn.Module):
    """``features`` (stem, inverted residuals, last 1×1 conv), ``avgpool``, ``classifier``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, settings=TINY_MOBILENETV2, stem: int = 16,
                 last_channels: int = 128, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, stem)]
        c = stem
        for t, planes, s in settings:
            layers.append(InvertedResidual(c, planes, s, t))
            c = planes
        layers.append(ConvBNReLU6(c, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- SENet ------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with 1×1 convs as the two fc layers."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class SEBasicBlock(BasicBlock):
    """A post-activation BasicBlock whose branch is rescaled by squeeze-and-excitation before the add."""

    reduction = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__(inplanes, planes, stride, downsample)
        self.se = SqueezeExcitation(planes, max(planes // self.reduction, 4))

    def residual(self, x):
        return self.se(super().residual(x))


# --- registry ---------------------------------------------------------------------------------

@register_model
def tiny_densenet(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """Two dense blocks of 3 layers (growth 8) around a transition; about 13K parameters."""
    return TinyDenseNet(in_channels, num_classes, **kw)


@register_model
def tiny_mobilenetv2(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """Stem, 4 inverted residual blocks (16-24-24-32 channels), 1×1 conv to 128; about 23K parameters."""
    return TinyMobileNetV2(in_channels, num_classes, **kw)


@register_model
def tiny_senet(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """CIFAR-style stem and 3 SE BasicBlocks (16, 16, 32 channels; the last one downsamples); about 26K parameters."""
    return ResNet(SEBasicBlock, [2, 1], (16, 32), in_channels, num_classes, cifar_stem=True, **kw)
