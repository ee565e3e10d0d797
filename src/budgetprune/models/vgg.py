"""A small VGG-style CNN for 28×28 and 32×32 images (conv-BN-ReLU stages, max-pool)."""

from __future__ import annotations

from torch import nn

from .registry import register_model

#: Widths per stage; "M" is a 2×2 max-pool.
VGG_SMALL = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGG(nn.Module):
    """torchvision-like layout: ``features`` (conv-BN-ReLU, pools), ``avgpool``, ``classifier``."""

    def __init__(self, cfg=VGG_SMALL, in_channels: int = 3, num_classes: int = 10, hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


@register_model
def vgg_small(in_channels: int = 3, num_classes: int = 10, input_size=(32, 32)) -> nn.Module:
    """VGG-style 32-32-M-64-64-M-128-128-M with BN, global average pool, fc 256 (28×28 or 32×32)."""
    return VGG(VGG_SMALL, in_channels, num_classes)
