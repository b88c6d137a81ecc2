"""Aligned geometric transforms for the image-like modalities of one sample.

One crop box and one flip are drawn per sample, in coordinates relative to the image, and applied to every
image-like modality (RGB, depth, edges, semseg...), each resized with its own interpolation, so they stay
aligned even when stored at different resolutions.

Why not torchvision's RandomResizedCrop: it draws from torch's global RNG, and a resumed run must replay
exactly the same crops. Here the draw comes from a per-sample `random.Random`, seeded from the sample's place
in the stream, so augmentation is a pure function of (seed, epoch, position) and needs no saved RNG state.
Speed: JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop is that much larger than the output, and the
crop is resized as a uint8 tensor view by torch's antialiased kernels, which are about 3x faster than
Pillow's resize on one core.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from polymodal.modalities import JpegData, Modality, load_pixels

RelBox = tuple[float, float, float, float]  # left, top, right, bottom as fractions of width/height


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> RelBox:
    """RandomResizedCrop's box (same algorithm as torchvision: 10 tries, then a centre fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return left / width, top / height, (left + crop_w) / width, (top + crop_h) / height
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left / width, top / height, (left + crop_w) / width, (top + crop_h) / height


def center_box(width: int, height: int, out_w: int, out_h: int) -> RelBox:
    """The box that Resize(shorter side) + CenterCrop picks, as one crop-and-resize."""
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left / width, top / height, (left + crop_w) / width, (top + crop_h) / height


def decode_at_least(img: Image.Image | JpegData, modality: Modality, min_size: tuple[int, int] | None) -> torch.Tensor:
    """Decode to a [C,H,W] tensor; JPEGs at the smallest DCT scale that is still at least `min_size` (w, h)."""
    if isinstance(img, JpegData):
        return torch.from_numpy(img.decode(min_size)).permute(2, 0, 1)
    if min_size is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
        img.draft(img.mode, min_size)  # Pillow's reduced-size JPEG decoding (1/2, 1/4, 1/8)
    return modality.to_tensor(load_pixels(img))


def crop_resize(img: Image.Image | JpegData, box: RelBox, size: tuple[int, int], modality: Modality, flip: bool,
                fast_decode: bool = True) -> torch.Tensor:
    """Decode `img` (opened, not yet decoded), crop `box`, resize to `size` (w, h): a [C,h,w] tensor."""
    min_size = None
    if fast_decode:
        # The decoded image may shrink while the crop keeps at least `size` pixels each way. Only 1/2, 1/4, 1/8:
        # libjpeg-turbo's SIMD code covers those scales, and the odd eighths decode slower than full size.
        width, height = img.size
        room = min((box[2] - box[0]) * width / size[0], (box[3] - box[1]) * height / size[1])
        factor = next((f for f in (8, 4, 2) if f <= room), 1)
        if factor > 1:
            min_size = (math.ceil(width / factor), math.ceil(height / factor))
    tensor = decode_at_least(img, modality, min_size)
    h, w = tensor.shape[-2:]
    left, top = min(round(box[0] * w), w - 1), min(round(box[1] * h), h - 1)
    right, bottom = max(left + 1, round(box[2] * w)), max(top + 1, round(box[3] * h))
    # torch's antialiased uint8 resize (Pillow-SIMD's kernels) is about 3x faster than Pillow's own resize.
    out = F.resize(tensor[..., top:bottom, left:right], [size[1], size[0]], interpolation=modality.interpolation,
                   antialias=True)
    return out.flip(-1) if flip else out


@dataclass
class ImageTransform:
    """The default transform of the image-like modalities.

    size: output side in pixels (square), or None to keep images as decoded (no crop, no resize).
    train: RandomResizedCrop(scale, ratio) + horizontal flip with probability `hflip`;
           otherwise resize the shorter side and centre-crop.
    fast_decode: decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop is at least that much larger than the output.
    """

    size: int | None = 224
    train: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    fast_decode: bool = True

    def __call__(self, images: dict[str, tuple[Modality, Image.Image]], rng: random.Random,
                 crop: tuple[float, float, float, float, float] | None = None) -> dict:
        """Transform the image-like entries of one sample together; returns modality name -> tensor. `crop`
        (x0, y0, x1, y1 as fractions, flip) imposes the box and flip: that of a stored token crop."""
        if not images:
            return {}
        if crop is not None and self.size is not None:
            return {name: _finish(modality, crop_resize(img, tuple(crop[:4]), (self.size, self.size), modality,
                                                        bool(crop[4]), self.fast_decode))
                    for name, (modality, img) in images.items()}
        out = {}
        if self.size is None:
            for name, (modality, img) in images.items():
                out[name] = _finish(modality, modality.to_tensor(load_pixels(img)))
            return out
        first = next(iter(images.values()))[1]
        width, height = first.size
        if self.train:
            box = random_resized_box(width, height, self.scale, self.ratio, rng)
            flip = rng.random() < self.hflip
        else:
            box = center_box(width, height, self.size, self.size)
            flip = False
        for name, (modality, img) in images.items():
            out[name] = _finish(modality, crop_resize(img, box, (self.size, self.size), modality, flip,
                                                      self.fast_decode))
        return out


def _finish(modality: Modality, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if modality.channel_dim else tensor[0]
