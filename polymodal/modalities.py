"""The modality registry: for each modality, where it lives in a shard and how it becomes a tensor.

A sample is a dict keyed by modality name. Each `Modality` says which shard extensions hold it, how its bytes
are decoded, and how its default train/eval transform treats it. Image-like modalities (`geometry=True`) share
one crop and flip per sample (see `polymodal.data.transforms`), so an RGB image and its depth map stay aligned.

Adding a modality is one `register(Modality(...))` call; nothing else needs to change.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from polymodal.data.errors import ConfigError, SampleSkipped

# Pillow's own default (about 89 megapixels); images above it are skipped as decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Members with these extensions could carry pickled code; they are never decoded, only rejected and counted.
FORBIDDEN_EXTENSIONS = frozenset({"pth", "pt", "pyd", "pickle", "pkl", "ckpt"})

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def is_forbidden(extension: str) -> bool:
    return extension.rsplit(".", 1)[-1].lower() in FORBIDDEN_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Decoders: bytes -> python object. They raise SampleSkipped with a reason; nothing else escapes.


def open_image(data: bytes, extension: str = "", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Parse the image header only (no pixel decode yet), refusing empty, unreadable and oversized images.

    Pixels are decoded later by the transform, which can then ask the JPEG decoder for a reduced size.
    """
    if not data:
        raise SampleSkipped("empty_member", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleSkipped("image_too_large", str(exc)) from None
    except Exception as exc:  # Pillow raises several types for unreadable bytes
        raise SampleSkipped("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise SampleSkipped("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    return img


class JpegData:
    """A JPEG whose header is read but whose pixels are not decoded yet.

    JPEGs are decoded with libjpeg-turbo through simplejpeg rather than Pillow: identical pixels, and much less
    overhead per image (about 8x less on 32x32 CIFAR images).
    """

    format = "JPEG"
    mode = "RGB"

    def __init__(self, data: bytes, width: int, height: int):
        self.data, self.size = data, (width, height)

    def decode(self, min_size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [H, W, 3]; at least `min_size` (w, h) when given, else full size."""
        try:
            if min_size is None:
                return simplejpeg.decode_jpeg(self.data, "RGB")
            return simplejpeg.decode_jpeg(self.data, "RGB", min_width=min_size[0], min_height=min_size[1])
        except ValueError as exc:
            raise SampleSkipped("corrupt_image", f"JPEG: {exc}") from None

    def load(self) -> None:
        self.decode()


def open_rgb(data: bytes, extension: str = "", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image | JpegData:
    """A colour image, header only: JpegData for plain (YCbCr/grey) JPEGs, a lazily-decoded PIL image otherwise."""
    if data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise SampleSkipped("corrupt_image", f"JPEG header: {exc}") from None
        if width * height > max_pixels:
            raise SampleSkipped("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
        if colorspace in ("YCbCr", "Gray", "RGB"):
            return JpegData(data, width, height)
    return open_image(data, extension, max_pixels)


def load_pixels(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as exc:
        raise SampleSkipped("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return img


def decode_text(data: bytes, extension: str = "", max_pixels: int = 0) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleSkipped("bad_text", str(exc)) from None


def decode_label(data: bytes, extension: str = "", max_pixels: int = 0) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleSkipped("bad_label", f"label bytes {data[:20]!r} are not an integer") from None


def decode_npy(data: bytes, extension: str = "", max_pixels: int = 0) -> np.ndarray:
    if not data:
        raise SampleSkipped("empty_member", "zero-byte array")
    try:
        # allow_pickle=False: object arrays would unpickle shard content.
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise SampleSkipped("bad_array", f"{type(exc).__name__}: {exc}") from None


def decode_dense(data: bytes, extension: str = "", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A dense map as a PIL image: 8/16-bit PNG as is, a 2-D .npy as a float32 ('F') image."""
    if extension.endswith("npy"):
        array = decode_npy(data)
        if array.ndim != 2:
            raise SampleSkipped("bad_array", f"dense map must be 2-D, got shape {array.shape}")
        return Image.fromarray(array.astype(np.float32), mode="F")
    return open_image(data, extension, max_pixels)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: the inverse of the decoders, for writers (shards, derived and token sets).


def npy_bytes(array: np.ndarray) -> bytes:
    """A numeric array as .npy bytes (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    """A 2-D uint8 (or uint16) array as a greyscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Tensor conversion (before the geometric transform, which runs on tensors).


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparent areas composited over white (plain convert('RGB') leaves arbitrary colours there)."""
    if img.mode == "RGB":
        return img
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def rgb_tensor(img: Image.Image | JpegData) -> torch.Tensor:
    """uint8 [3, H, W] (a channels-last view); batches stay uint8 until the model normalises them on its device."""
    if isinstance(img, JpegData):
        return torch.from_numpy(img.decode()).permute(2, 0, 1)
    return _from_pil(to_rgb(img)).permute(2, 0, 1)


def map_tensor(img: Image.Image) -> torch.Tensor:
    """[1, H, W]: uint8 for 8-bit maps, float32 for 16-bit, 32-bit and float maps."""
    if img.mode not in ("L", "I;16", "I", "F"):
        img = img.convert("L")
    tensor = _from_pil(img)
    return (tensor if tensor.dtype == torch.uint8 else tensor.float())[None]


def label_map_tensor(img: Image.Image) -> torch.Tensor:
    """int64 [1, H, W] class indices (palette images keep their indices)."""
    if img.mode not in ("L", "P", "I;16", "I"):
        img = img.convert("L")
    return _from_pil(img).long()[None]


def _from_pil(img: Image.Image) -> torch.Tensor:
    # np.asarray wraps a private copy of the pixels that Pillow made for it; it is flagged read-only only because
    # that copy is a bytes object, so sharing it avoids a second copy of every image.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img))


# ---------------------------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class Modality:
    """One modality. `extensions` are tried in order; the first is what the shard writer uses.

    `decode(data, extension, max_pixels)` turns a member's bytes into a python object or raises SampleSkipped.
    """

    name: str
    extensions: tuple[str, ...]
    decode: Callable[..., Any]
    description: str
    # Image-like modalities share one crop/flip per sample; `interpolation` is how this one is resized, and
    # `to_tensor` gives [C,H,W]; `channel_dim=False` drops C after the transform (class-index maps are [H,W]).
    geometry: bool = False
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    to_tensor: Callable[[Any], Any] | None = None
    channel_dim: bool = True
    # Token ids written by `polymodal data tokenize`: checked against their set's vocabulary and grid when read,
    # and one stored crop is picked per sample (see polymodal.data.token_data).
    tokens: bool = False

    def find(self, sample: dict) -> str | None:
        """The member extension in `sample` that holds this modality, or None."""
        for ext in self.extensions:
            if ext in sample:
                return ext
        return None


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.name in _REGISTRY:
        raise ValueError(f"modality {modality.name!r} is already registered")
    _REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    if name not in _REGISTRY and name.startswith(TOKEN_PREFIX) and len(name) > len(TOKEN_PREFIX):
        return register(token_modality(name))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown modality {name!r}; known: {', '.join(sorted(_REGISTRY))}, and tok_<name> "
                          "for token ids") from None


TOKEN_PREFIX = "tok_"


def token_modality(name: str) -> Modality:
    """`tok_<modality>`: the token ids of a modality, a uint16 (or int32) .npy of [crops, h, w] for image-like
    modalities and [length] for sequences. Every tok_ name is known; they are registered when first asked for."""
    return Modality(name, (f"{name}.npy",), decode_npy, f"token ids of {name[len(TOKEN_PREFIX):]} (.npy, uint16 or "
                    "int32) -> int64 [h,w] (one stored crop) or [length]", tokens=True)


def names() -> list[str]:
    return sorted(_REGISTRY)


register(Modality("rgb", IMAGE_EXTENSIONS, open_rgb, "colour image (JPEG/PNG/WebP) -> uint8 [3,H,W]",
                  geometry=True, to_tensor=rgb_tensor))
register(Modality("caption", ("txt",), decode_text, "UTF-8 text -> str (or token ids through a tokenizer)"))
register(Modality("label", ("cls",), decode_label, "integer class label -> int64"))
for _name, _what, _interpolation, _tensor in (
    ("depth", "depth map", InterpolationMode.BILINEAR, map_tensor),
    ("edges", "edge map", InterpolationMode.BILINEAR, map_tensor),
    ("semseg", "semantic segmentation (class index per pixel)", InterpolationMode.NEAREST_EXACT, label_map_tensor),
):
    register(Modality(_name, (f"{_name}.png", f"{_name}.npy"), decode_dense,
                      f"{_what}, 8/16-bit PNG or 2-D .npy -> [1,H,W]" if _name != "semseg" else
                      f"{_what}, 8-bit PNG or 2-D .npy -> int64 [H,W]",
                      geometry=True, interpolation=_interpolation, to_tensor=_tensor,
                      channel_dim=_name != "semseg"))
register(Modality("array", ("npy",), decode_npy, "any numeric .npy array (never unpickled) -> tensor",
                  to_tensor=torch.from_numpy))
register(Modality("crops", ("crops.npy",), decode_npy, "the crop boxes stored with token ids (x0, y0, x1, y1 in [0, 1], "
                  "flipped) -> float32 [5] (the crop picked)"))


# ---------------------------------------------------------------------------------------------------------------
# Derived modalities: what `polymodal data derive` writes (polymodal/data/derive_shards.py), each in its own shard
# set joined by key. "edges" is registered above (its set holds edges.png, Canny edges as 0/255).
# Maps at the image's resolution share its crop and flip; HOG and EfficientNet feature maps do not (a flip would
# have to mirror HOG's orientation bins, and their cells are coarser than a pixel): they are targets of the image
# as stored. Box text is in coordinates of the image as stored, too.


def float_map_tensor(array: np.ndarray) -> torch.Tensor:
    """A stored float16/float32 map [C, h, w] -> float32 tensor."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


register(Modality("grey", ("grey.png",), decode_dense, "luminance (ITU-R 601), 8-bit PNG -> uint8 [1,H,W]",
                  geometry=True, interpolation=InterpolationMode.BILINEAR, to_tensor=map_tensor))
for _name, _what in (("clusters", "k-means colour clusters in Lab per image (0 = largest), 8-bit PNG"),
                     ("fgmask", "class-painted foreground (Otsu; class id + 1, background 0), 8/16-bit PNG")):
    register(Modality(_name, (f"{_name}.png",), decode_dense, f"{_what} -> int64 [H,W]", geometry=True,
                      interpolation=InterpolationMode.NEAREST_EXACT, to_tensor=label_map_tensor, channel_dim=False))
register(Modality("hog", ("hog.npy",), decode_npy, "HOG cells (MaskFeat target), float16 .npy [bins,H/cell,W/cell] "
                  "-> float32 (not cropped)", to_tensor=float_map_tensor))
register(Modality("effnet_map", ("effnet_map.npy",), decode_npy, "EfficientNet-Lite0 stride-16 features, float16 "
                  ".npy [112,S/16,S/16] -> float32 (not cropped)", to_tensor=float_map_tensor))
for _name, _what in (("box", "foreground box 'v0=x0 v0=y0 v0=x1 v0=y1 <class>' (edges binned 0..255)"),
                     ("palette", "k-means Lab palette 'v1=k v0=R v0=G v0=B ...'"),
                     ("metadata", "binned image metadata 'v1=<key> v0=<bin> ...'"),
                     ("effnet_caption", "caption from EfficientNet-Lite0's top-2 ImageNet classes")):
    register(Modality(_name, (f"{_name}.txt",), decode_text, f"{_what}, text -> str (or token ids)"))
