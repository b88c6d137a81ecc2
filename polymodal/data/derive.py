"""Modalities derived from plain images, batched on any device (in the spirit of 4M-21's pseudo-labels, but free
of networks with weights): greyscale, Canny edges, a colour palette, image metadata, and class-painted foreground
masks for single-object greyscale sets. They run inside a training step (MultiMAE wants them without extra shards)
and are what `polymodal data derive` (to come) will write to shards.

Images are uint8 or float RGB [B, 3, H, W] (float in [0, 1]). Edges and colour conversions are kornia's
(maintained, differentiable, on the device); k-means and Otsu are a few batched torch lines each, because the
libraries that have them (scikit-learn, scikit-image) run one image at a time on the CPU.
"""

from __future__ import annotations

import torch


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


def palette(rgb: torch.Tensor, k: int = 5, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """k colours per image by k-means in Lab space (Lloyd's algorithm, batched, seeded), largest cluster first:
    uint8 [B, k, 3]."""
    from kornia.color import lab_to_rgb, rgb_to_lab

    lab = rgb_to_lab(as_float(rgb)).flatten(2).transpose(1, 2)  # [B, N, 3]
    b, n, _ = lab.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)]).to(lab.device)
    centres = torch.gather(lab, 1, start[..., None].expand(-1, -1, 3))
    for _ in range(iterations):
        assign = torch.cdist(lab, centres).argmin(-1)  # [B, N]
        onehot = torch.nn.functional.one_hot(assign, k).to(lab.dtype)  # [B, N, k]
        counts = onehot.sum(1)  # [B, k]
        sums = onehot.transpose(1, 2) @ lab  # [B, k, 3]
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    order = counts.argsort(-1, descending=True)
    centres = torch.gather(centres, 1, order[..., None].expand(-1, -1, 3))
    colours = lab_to_rgb(centres.transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
    return (colours.clamp(0, 1) * 255).round().to(torch.uint8)


def metadata(rgb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image figures, each [B]: brightness and contrast (mean and std of luminance), saturation (mean HSV
    saturation), colourfulness (Hasler and Suesstrunk 2003, on 0-255 values), entropy (bits, of the 256-bin
    luminance histogram) and edge density (share of Canny edge pixels)."""
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
    return {"brightness": lum.mean(1), "contrast": lum.std(1),
            "saturation": rgb_to_hsv(x)[:, 1].flatten(1).mean(1), "colourfulness": colourful,
            "entropy": entropy, "edge_density": edges(x).flatten(1).float().mean(1)}


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
