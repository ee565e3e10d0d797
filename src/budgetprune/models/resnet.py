"""Residual networks, laid out like torchvision's ``ResNet`` (``conv1``, ``bn1``, ``relu``,
``layer1``..``layerN``, ``avgpool``, ``fc``).

* ``resnet20``, ``resnet56``: the CIFAR ResNets of He et al., "Deep Residual Learning for
  Image Recognition" (CVPR 2016, Sec. 4.2): a 3×3 stem and three stages of n BasicBlocks
  with 16/32/64 channels (6n+2 layers). The first block of stages 2 and 3 halves the maps
  with a stride-2 ``conv1`` and a projection shortcut conv1×1-BN (option B), the "pooling
  block" of BAR (Lemaire et al., "Structured Pruning of Neural Networks with
  Budget-Aware Regularization", CVPR 2019, Fig. 3b).
* ``resnet50``: the ImageNet ResNet-50 of the same paper, exactly torchvision's layout
  (Bottleneck blocks with the stride on the 3×3 conv, "ResNet v1.5").

All ReLUs are separate-output (``inplace=False``): gates are applied by forward hooks that
multiply module outputs, and an in-place op after a hooked module would be a hazard.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation of convs, BatchNorm γ = 1 and β = 0, as torchvision does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution with no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block: conv3×3-BN-ReLU-conv3×3-BN, add the shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def residual(self, x):
        """The branch before the add (subclasses extend it, e.g. with squeeze-and-excitation)."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual(x) + identity)


class Bottleneck(nn.Module):
    """conv1×1-BN-ReLU-conv3×3(stride)-BN-ReLU-conv1×1(×4)-BN, add the shortcut, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, one stage ``layer{i}`` per entry of ``layers`` (the first at stride 1, the
    others at stride 2), global average pooling and ``fc``.

    ``cifar_stem=True`` gives the CIFAR stem (conv3×3, no max-pool); otherwise the ImageNet
    stem (conv7×7 stride 2, max-pool 3×3 stride 2).
    """

    def __init__(self, block: type[nn.Module], layers, widths=(64, 128, 256, 512), in_channels: int = 3,
                 num_classes: int = 1000, cifar_stem: bool = False, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = conv3x3(in_channels, self.inplanes)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = None if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (name, blocks, width) in enumerate(zip(self.stages, layers, widths)):
            setattr(self, name, self._make_layer(block, width, blocks, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[len(layers) - 1] * block.expansion, num_classes)

        init_weights(self)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, in_channels: int = 3, num_classes: int = 10, **kw) -> ResNet:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n+2 layers (n BasicBlocks per stage)."""
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], (16, 32, 64), in_channels, num_classes, cifar_stem=True, **kw)


@register_model
def resnet20(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """CIFAR ResNet-20 (3×3 BasicBlocks, 16/32/64 channels), projection shortcuts at stage changes."""
    return cifar_resnet(20, in_channels, num_classes, **kw)


@register_model
def resnet56(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """CIFAR ResNet-56 (9 BasicBlocks per stage, 16/32/64 channels), projection shortcuts at stage changes."""
    return cifar_resnet(56, in_channels, num_classes, **kw)


@register_model
def resnet50(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28), **kw) -> nn.Module:
    """ResNet-50 exactly as torchvision's (25,557,032 parameters for 3 channels and 1000 classes).

    Any input of 32×32 or more keeps a spatial map to the last stage; smaller ones (28×28)
    still run, the last stages then work on 1×1 maps.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512), in_channels, num_classes, **kw)
