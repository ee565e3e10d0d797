"""Image files to tensors: decoding with Pillow, resizing, cropping and flipping.

Every image becomes 3-channel RGB: grayscale is repeated over the channels, the alpha channel
of RGBA / LA / transparent palette images is dropped (the colours under it are kept), 16-bit
grayscale is scaled to 8 bits (32-bit and float values are clipped to 0..255, as Pillow
converts them); an animated GIF or WebP gives its first frame.

:class:`ImageTransform` turns a decoded image into a uint8 (3, N, N) tensor:

* evaluation (and ``augment="none"``): the centre square of the image (the shorter side, the
  longer side cropped symmetrically) resized to N x N, which is "resize the shorter side to N,
  then centre-crop N x N" in one resampling;
* ``"flip"``: the same, mirrored left-right with probability 1/2;
* ``"crop-flip"``: a random crop covering 25-100 % of the image's area with an aspect ratio
  in [3/4, 4/3] (Inception's random-resized-crop, with a larger minimum area because small
  datasets do not need the 8 % of ImageNet training) resized to N x N, then the flip.

Random draws come from a ``random.Random`` seeded per sample, so an image's augmentation
depends only on its seed, not on which DataLoader worker decodes it. Pillow's bilinear
resampling filters over the whole source area when shrinking (antialiased).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, first_line

__all__ = ["IMAGE_EXTENSIONS", "AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "is_image_file", "decode_rgb",
           "ImageTransform"]

#: File name endings read as images (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

#: Training augmentation presets; evaluation never augments.
AUGMENTATIONS = ("none", "flip", "crop-flip")

#: Per-channel mean and standard deviation of ImageNet's training images (pixel values in [0, 1]):
#: the normalisation of folder data, fixed so that a model file is scored on any folder exactly as
#: it was trained, and the one pretrained torchvision/timm networks expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``crop-flip``: the crop's share of the image area, and its aspect ratio (width / height).
CROP_AREA = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

_BILINEAR = Image.Resampling.BILINEAR


def is_image_file(name: str) -> bool:
    """Whether ``name`` is a visible file name with an image extension (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def decode_rgb(path: Path, size_hint: int | None = None) -> Image.Image:
    """The image in ``path`` as an RGB Pillow image (first frame of an animation).

    ``size_hint`` lets Pillow decode a JPEG at a reduced scale (1/2, 1/4, 1/8) whose sides are
    still at least that many pixels: the same result after resizing to that size, much faster
    for photos. A file Pillow cannot read raises a one-line :class:`DataError` naming it.
    """
    try:
        with Image.open(path) as image:
            if size_hint is not None:
                image.draft("RGB", (size_hint, size_hint))
            return _to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ... on bad files
        raise DataError(f"cannot read the image {path} ({type(exc).__name__}: {first_line(exc)}): "
                        "remove the file or replace it with a readable image") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as a new RGB image (the pixels loaded; the file may be closed after)."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale (PNG): 0..65535 to 0..255, not clipped
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(values.round().astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """A decoded image -> uint8 tensor (3, ``size``, ``size``), augmented as ``augment`` says."""

    size: int
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")

    @property
    def augments(self) -> bool:
        return self.augment != "none"

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``image`` (RGB) cropped, resized and flipped; ``rng`` None: no augmentation (evaluation)."""
        augment = self.augment if rng is not None else "none"
        w, h = image.size
        box = random_crop_box(w, h, rng) if augment == "crop-flip" else centre_square(w, h)
        out = image.resize((self.size, self.size), _BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)
        if augment in ("flip", "crop-flip") and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels.contiguous()


def centre_square(w: int, h: int) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) of the largest centred square of a w x h image."""
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def random_crop_box(w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
    """A random box of ``CROP_AREA`` of the image's area and aspect ratio in ``CROP_RATIO``; after
    ``CROP_ATTEMPTS`` draws that do not fit, the centre square."""
    area = w * h
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return left, top, left + cw, top + ch
    return centre_square(w, h)
