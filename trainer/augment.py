"""Remote-sensing training augmentations, applied to the PIL image before open_clip's normalisation.

Overhead imagery has no canonical "up": every 90° rotation and both flips of a scene are equally
valid views (RemoteCLIP, SkyScript), and GeoRSCLIP adds arbitrary 0–360° rotations
(``rotate_any``; the corners the rotation uncovers are filled with the normalisation mean so they
become zeros after normalising). Order: [arbitrary rotation] → random resized crop → random
multiple-of-90° rotation → horizontal/vertical flips → tensor → normalise.

Every random draw comes from the ``random.Random`` passed per sample, so the trainer can make an
augmentation a function of (seed, worker, stream position) and resume reproduces it exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def random_resized_crop_params(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop picks them, from ``rng``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    # fallback: the whole image, centre-cropped to the ratio bounds
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class RSAugment:
    """``augment(img, rng) -> normalised float tensor [3, size, size]``."""

    def __init__(
        self,
        image_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        rot90: bool = True,
        hflip: bool = True,
        vflip: bool = True,
        rotate_any: bool = False,
        interpolation: str = "bicubic",
    ):
        size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.size = (size, size) if isinstance(size, int) else size
        self.mean, self.std = list(mean), list(std)
        self.scale, self.ratio = scale, ratio
        self.rot90, self.hflip, self.vflip, self.rotate_any = rot90, hflip, vflip, rotate_any
        self.interp = _INTERP[interpolation]

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.rotate_any:
            fill = [round(255 * m) for m in self.mean]
            img = TF.rotate(img, rng.uniform(0.0, 360.0), interpolation=InterpolationMode.BILINEAR,
                            fill=fill)
        w, h = img.size
        top, left, ch, cw = random_resized_crop_params(w, h, self.scale, self.ratio, rng)
        img = TF.resized_crop(img, top, left, ch, cw, list(self.size), interpolation=self.interp,
                              antialias=True)
        if self.rot90:
            k = rng.randrange(4)
            if k:
                img = img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                     Image.Transpose.ROTATE_270)[k - 1])
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.vflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)
