"""Model registry: ``create_model("lenet5", in_channels=1, num_classes=10, input_size=(28, 28))``.

Our own plain-torch models, laid out like torchvision's (``features`` / ``classifier``), so
a user's model of the same shape looks the same to the channel graph.
"""

from .registry import available_models, create_model, register_model
from . import lenet, resnet, small, vgg, wide_resnet  # noqa: F401  (registers the models)

__all__ = ["available_models", "create_model", "register_model"]
