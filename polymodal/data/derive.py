"""Modalities derived from plain images, batched on any device (in the spirit of 4M-21's pseudo-labels, but free
of networks with weights): greyscale, Canny edges, a colour palette, image metadata, class-painted foreground masks
for single-object greyscale sets, HOG maps (MaskFeat's target) and colour-cluster maps. They run inside a
training step (MultiMAE wants them without extra shards) and are what `polymodal data derive` writes to shards
(polymodal/data/derive_shards.py).

Images are uint8 or float RGB [B, 3, H, W] (float in [0, 1]). Edges and colour conversions are kornia's
(maintained, differentiable, on the device); k-means, Otsu and HOG are a few batched torch lines each, because the
libraries that have them (scikit-learn, scikit-image) run one image at a time on the CPU, and kornia has no HOG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The value range of each metadata figure, binned linearly into 256 bins when written as text ("v1=<index of the key
# here> v0=<bin>", `polymodal.tokenizers.text.serialize_metadata`); values outside are clamped to the end bins.
# Ranges are set from what the figures can reach on natural images, not their theoretical maxima, so the bins are
# not wasted: contrast (luminance std) tops out near 0.5 for a black-and-white image, colourfulness passes 100 only
# for very vivid pictures, and Canny edges cover at most about a third of a (tiny, 32 px) CIFAR-10 image, far less of
# a larger photo. Width and height are the image's size in pixels as stored in the source shard.
METADATA_RANGES: dict[str, tuple[float, float]] = {
    "brightness": (0.0, 1.0),
    "contrast": (0.0, 0.5),
    "saturation": (0.0, 1.0),
    "colourfulness": (0.0, 150.0),
    "entropy": (0.0, 8.0),
    "edge_density": (0.0, 0.4),
    "foreground_area": (0.0, 1.0),
    "width": (0.0, 2048.0),
    "height": (0.0, 2048.0),
}


def as_float(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """Luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B), [B, 1, H, W] in [0, 1]."""
    from kornia.color import rgb_to_grayscale

    return rgb_to_grayscale(as_float(rgb))


def edges(rgb: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges (kornia: Gaussian blur, Sobel, non-maximum suppression, hysteresis between `low` and `high`
    gradient magnitudes), uint8 [B, 1, H, W] of 0/1."""
    from kornia.filters import canny

    return (canny(grey(rgb), low_threshold=low, high_threshold=high, sigma=(sigma, sigma))[1] > 0).to(torch.uint8)


def kmeans_lab(rgb: torch.Tensor, k: int, iterations: int = 10,
               seed: int | Sequence[int] = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of each image's pixels in Lab space (k-means++ start, then Lloyd's algorithm, batched). Returns the
    centres, Lab [B, k, 3], largest cluster first, and each pixel's cluster in that order, int64 [B, H, W].

    `seed`: one int seeds the whole batch; a sequence gives each image its own seed, so an image's clusters do not
    depend on which batch it came in (what `polymodal data derive` needs for reproducible shards)."""
    from kornia.color import rgb_to_lab

    lab = rgb_to_lab(as_float(rgb)).flatten(2).transpose(1, 2)  # [B, N, 3]
    b, n, _ = lab.shape
    if isinstance(seed, int):
        uniform = torch.rand(b, k, generator=torch.Generator(device="cpu").manual_seed(seed))
    else:
        uniform = torch.stack([torch.rand(k, generator=torch.Generator(device="cpu").manual_seed(int(s)))
                               for s in seed])
    centres = _kmeanspp_start(lab, uniform.to(lab.device))

    def nearest(centres: torch.Tensor) -> torch.Tensor:  # [B, N]; |x - c|^2 less |x|^2: one batched matmul
        return (centres.square().sum(-1)[:, None, :] - 2 * lab @ centres.transpose(1, 2)).argmin(-1)

    for _ in range(iterations):
        assign = nearest(centres)
        onehot = torch.nn.functional.one_hot(assign, k).to(lab.dtype)  # [B, N, k]
        counts = onehot.sum(1)  # [B, k]
        sums = onehot.transpose(1, 2) @ lab  # [B, k, 3]
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    assign = nearest(centres)  # the pixels of the final centres
    counts = torch.zeros(b, k, device=lab.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=lab.dtype))
    order = counts.argsort(dim=-1, descending=True, stable=True)  # [B, k]: old index of the i-th largest
    rank = order.argsort(-1)  # [B, k]: new index of each old one
    centres = torch.gather(centres, 1, order[..., None].expand(-1, -1, 3))
    return centres, torch.gather(rank, 1, assign).view(b, *rgb.shape[-2:])


def _kmeanspp_start(lab: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """k-means++ starting centres [B, k, 3]: the first pixel at random, each next one with probability proportional
    to its squared distance from the centres so far (drawn by inverting the cumulative sum with `uniform` [B, k]).
    A plain random start often puts several centres in one flat background and never separates the rest."""
    rows = torch.arange(len(lab), device=lab.device)
    index = (uniform[:, 0] * lab.shape[1]).long().clamp_max(lab.shape[1] - 1)
    centres = [lab[rows, index]]
    distance = (lab - centres[0][:, None]).square().sum(-1)  # [B, N]
    for j in range(1, uniform.shape[1]):
        cumulative = distance.cumsum(1)
        index = torch.searchsorted(cumulative, uniform[:, j:j + 1] * cumulative[:, -1:]).squeeze(1)
        centres.append(lab[rows, index.clamp_max(lab.shape[1] - 1)])
        distance = torch.minimum(distance, (lab - centres[-1][:, None]).square().sum(-1))
    return torch.stack(centres, 1)


def palette(rgb: torch.Tensor, k: int = 5, iterations: int = 10, seed: int | Sequence[int] = 0) -> torch.Tensor:
    """k colours per image by k-means in Lab space (`kmeans_lab`), largest cluster first: uint8 [B, k, 3]."""
    from kornia.color import lab_to_rgb

    centres, _ = kmeans_lab(rgb, k, iterations, seed)
    colours = lab_to_rgb(centres.transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
    return (colours.clamp(0, 1) * 255).round().to(torch.uint8)


def colour_clusters(rgb: torch.Tensor, k: int = 8, iterations: int = 10,
                    seed: int | Sequence[int] = 0) -> torch.Tensor:
    """A segmentation-like map of colour regions: each pixel's k-means cluster in Lab (`kmeans_lab`), 0 for the
    largest cluster, uint8 [B, H, W] with values < k. A colour-only cousin of superpixels: no spatial term, so one
    cluster may cover several separate regions of the same colour."""
    return kmeans_lab(rgb, k, iterations, seed)[1].to(torch.uint8)


def hog(rgb: torch.Tensor, cell: int = 8, bins: int = 9, eps: float = 0.005) -> torch.Tensor:
    """Histograms of oriented gradients on a dense grid of cells (MaskFeat's target): float32 [B, bins, H // cell,
    W // cell] (pixels past the last whole cell are left out).

    Sobel gradients of the luminance; unsigned orientation in [0, pi), bin b centred on b * pi / bins (so bin 0 is a
    horizontal gradient: a vertical edge), each pixel's magnitude split linearly between its two nearest bins and
    averaged over the cell. Each cell's histogram is then L2-normalised as MaskFeat does, with `eps` (a mean
    gradient of about one grey level per pixel) added to the norm, so flat cells and JPEG noise stay near 0 instead
    of being blown up to unit length."""
    from kornia.filters import spatial_gradient

    grad = spatial_gradient(grey(rgb), mode="sobel", order=1, normalized=True)[:, 0]  # [B, 2, H, W]: d/dx, d/dy
    gx, gy = grad[:, 0], grad[:, 1]
    magnitude = torch.sqrt(gx.square() + gy.square())
    position = torch.remainder(torch.atan2(gy, gx), math.pi) * (bins / math.pi)  # [0, bins]
    low = position.floor()
    share = position - low
    low = low.long() % bins
    hist = torch.zeros(len(rgb), bins, *magnitude.shape[-2:], device=magnitude.device)
    hist.scatter_add_(1, low[:, None], (magnitude * (1 - share))[:, None])
    hist.scatter_add_(1, ((low + 1) % bins)[:, None], (magnitude * share)[:, None])
    h, w = hist.shape[-2] // cell, hist.shape[-1] // cell
    cells = torch.nn.functional.avg_pool2d(hist[..., :h * cell, :w * cell], cell)
    return cells / torch.sqrt(cells.square().sum(1, keepdim=True) + eps * eps)


def metadata(rgb: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0,
             edge_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image figures, each [B]: brightness and contrast (mean and std of luminance), saturation (mean HSV
    saturation), colourfulness (Hasler and Suesstrunk 2003, on 0-255 values), entropy (bits, of the 256-bin
    luminance histogram) and edge density (share of Canny edge pixels: of `edge_map` when given, else of `edges`
    with `low`, `high`, `sigma`)."""
    from kornia.color import rgb_to_hsv

    x = as_float(rgb)
    lum = grey(x).flatten(1)
    rg = (x[:, 0] - x[:, 1]).flatten(1) * 255
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1) * 255
    colourful = (rg.std(1).square() + yb.std(1).square()).sqrt() + 0.3 * (rg.mean(1).square()
                                                                          + yb.mean(1).square()).sqrt()
    bins = (lum * 255).round().long().clamp(0, 255)
    hist = torch.zeros(len(bins), 256, device=x.device).scatter_add_(1, bins, torch.ones_like(lum))
    p = hist / hist.sum(1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log2()).sum(1)
    edge_map = edges(x, low, high, sigma) if edge_map is None else edge_map
    return {"brightness": lum.mean(1), "contrast": lum.std(1),
            "saturation": rgb_to_hsv(x)[:, 1].flatten(1).mean(1), "colourfulness": colourful,
            "entropy": entropy, "edge_density": edge_map.flatten(1).float().mean(1)}


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold per row of `values` [B, N] in [0, 1] (256 bins): the level that maximises the variance
    between the two classes. Returns [B]; a pixel is foreground when above it."""
    bins = (values * 255).round().long().clamp(0, 255)
    hist = torch.zeros(len(values), 256, device=values.device).scatter_add_(1, bins, torch.ones_like(values))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(256, device=values.device, dtype=p.dtype)
    w0 = p.cumsum(1)  # weight of the class at or below each level
    mu = (p * levels).cumsum(1)
    between = (mu[:, -1:] * w0 - mu).square() / (w0 * (1 - w0)).clamp_min(1e-12)
    return between.argmax(1).to(values.dtype) / 255


def foreground_area(rgb: torch.Tensor) -> torch.Tensor:
    """The share of each image's pixels brighter than its Otsu threshold, [B] (the object's area for the single-object
    sets `foreground_mask` is meant for)."""
    lum = grey(rgb).flatten(1)
    return (lum > otsu_threshold(lum)[:, None]).float().mean(1)


def foreground_mask(rgb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A semantic segmentation for single-object images on a dark background (Fashion-MNIST, MNIST): pixels above
    the image's Otsu threshold get the class id + 1, the rest 0 (background). int64 [B, H, W]."""
    lum = grey(rgb)[:, 0]
    above = lum.flatten(1) > otsu_threshold(lum.flatten(1))[:, None]
    return torch.where(above.view_as(lum), labels.long().view(-1, 1, 1) + 1, torch.zeros_like(lum, dtype=torch.long))


def boxes(mask: torch.Tensor) -> torch.Tensor:
    """The box around each mask's nonzero pixels: [B, 4] (x0, y0, x1, y1, inclusive), -1 where a mask is empty."""
    present = mask != 0
    cols, rows = present.any(1), present.any(2)  # [B, W], [B, H]

    def first(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m.any(1), m.float().argmax(1), -1)

    def last(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m.any(1), m.shape[1] - 1 - m.flip(1).float().argmax(1), -1)

    return torch.stack([first(cols), first(rows), last(cols), last(rows)], 1)
