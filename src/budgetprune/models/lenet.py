"""LeNet-300-100 and LeNet-5-Caffe, the MNIST networks of Louizos et al. (2018)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .registry import register_model


class LeNet300(nn.Module):
    """784-300-100-10 fully connected network (its inputs can be gated, as in Louizos et al.)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden=(300, 100)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5×5, max-pool 2, conv 50@5×5, max-pool 2, fc 500, fc classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size=(28, 28)):
        super().__init__()
        h, w = input_size
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ConfigError(f"lenet5 needs inputs of at least 16×16, got {h}×{w}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * fh * fw, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model
def lenet300(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28)) -> nn.Module:
    """LeNet-300-100 (784-300-100 for 28×28 grey images)."""
    return LeNet300(in_channels * input_size[0] * input_size[1], num_classes)


@register_model
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size=(28, 28)) -> nn.Module:
    """LeNet-5-Caffe (20-50-800-500 on 28×28 images)."""
    return LeNet5(in_channels, num_classes, input_size)
