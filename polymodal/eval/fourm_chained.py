"""Held-out figures of a trained 4M run for generation through other modalities:

- chained caption -> segmentation -> edges -> image against caption -> image directly: the class the image shows
  (the pixel classifier of fourm_heldout), the class the generated segmentation paints, and how well the final
  image agrees with the segmentation and edges generated from the same caption: the IoU of its Otsu foreground
  with the segmentation's foreground and the F1 of its Canny edges against the generated edges (a pixel counts
  as matched within one pixel). For the direct path the image is compared with the segmentation and edges of the
  chained draw from the same caption, which it never saw: what agreement the class alone brings.
- edges -> image: images generated from the held-out images' edge tokens, PSNR against the real images, beside
  the mean training image (a baseline without learning, with each estimate's paired per-image gain over it) and
  the image tokenizer's own reconstruction (the ceiling).

Used by `python -m polymodal.eval.fourm_heldout ... --chain tok_fgmask tok_edges --psnr-from tok_edges`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from polymodal.data import derive


@functools.lru_cache(maxsize=16)
def _tokenizer_model(path: str):
    # Cached: the figures decode batch after batch, and a load reads the weights from disk and builds the model.
    from polymodal.tokenizers.registry import load_image_tokenizer

    return load_image_tokenizer(path)[0].tokenizer_model.eval()


def decoder_of(objective, name: str):
    """The image tokenizer that made modality `name`, and whether it decodes class maps (segmentation)."""
    model = _tokenizer_model(objective.modality_configs[name].tokenizer)
    return model, bool(model.classes)


def sampler(objective, schedule: str, seed: int, cfg: float = 1.0):
    """The generator every generation figure draws with: temperature 1, top-p 0.9, guidance `cfg`."""
    from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule

    return FourMGenerator(objective, Sampling(temperature=1.0, top_p=0.9, cfg=cfg), Schedule.parse(schedule), seed)


@torch.no_grad()
def decode_images01(objective, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Image tokens [B, h, w] -> pixels in [0, 1], [B, C, H, W] (three channels for a grey tokenizer's output)."""
    model, _ = decoder_of(objective, name)
    return _pixels01(model.decode(ids))


def _pixels01(x: torch.Tensor) -> torch.Tensor:
    """A tokenizer's decoded images in [-1, 1] -> [0, 1], three channels (a grey tokenizer's output repeated)."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def painted_class(segmentation: torch.Tensor, classes: int) -> torch.Tensor:
    """The class a class-painted map [B, H, W] of `classes` values (class id + 1, 0 background) shows: its most
    frequent non-zero value, minus one; -1 where nothing is painted."""
    counts = F.one_hot(segmentation.long().flatten(1), classes).sum(1)[:, 1:]  # [B, classes - 1], no background
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks [B, H, W] (1 where both are empty)."""
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def edge_f1(found: torch.Tensor, truth: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-sample F1 of edge maps [B, H, W] (bool): a found pixel is right when a true edge lies within
    `tolerance` pixels, a true pixel is recalled when a found one does (the usual boundary-F1 tolerance)."""
    def grow(m):
        return F.max_pool2d(m[:, None].float(), 2 * tolerance + 1, 1, tolerance)[:, 0] > 0

    precision = (found & grow(truth)).flatten(1).sum(1) / found.flatten(1).sum(1).clamp_min(1)
    recall = (truth & grow(found)).flatten(1).sum(1) / truth.flatten(1).sum(1).clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-9)


def chained_vs_direct(objective, classify, prompts, truth: torch.Tensor, schedule: str, image: str, caption: str,
                      chain: list[str], seed: int, cfg: float = 1.0) -> dict:
    """Caption -> chain... -> image against caption -> image, both from the same prompts (ids, lengths)."""
    def run(targets):
        return sampler(objective, schedule, seed, cfg).generate({caption: prompts}, targets)

    chained, direct = run([*chain, image]), run([image])
    maps = {}  # the chain's generated maps, decoded once: both paths are scored against them
    for name in chain:
        model, classes = decoder_of(objective, name)
        with torch.no_grad():
            maps[name] = (model.decode(chained[name]), model.classes if classes else 0)
    out = {"schedule": schedule, "cfg": cfg, "chain": [caption, *chain, image]}
    for path, generated in (("chained", chained), ("direct", direct)):
        pixels = decode_images01(objective, image, generated[image])
        figures = {"image_class_consistency": float((classify(pixels) == truth).float().mean())}
        for name, (decoded, classes) in maps.items():
            if classes:  # a segmentation: the class it paints, and its foreground against the image's
                painted = painted_class(decoded, classes)
                figures[f"{name}_class_consistency"] = float((painted == truth).float().mean())
                foreground = derive.foreground_mask(pixels, torch.zeros(len(pixels))) > 0
                figures[f"{name}_foreground_iou"] = float(iou(foreground, decoded > 0).mean())
            else:  # an edge map: the image's Canny edges against it
                found = derive.edges(pixels)[:, 0] > 0
                figures[f"{name}_edge_f1"] = float(edge_f1(found, decoded[:, 0] > 0).mean())
        out[path] = figures
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of [B, C, H, W] images in [0, 1]."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def expected_images01(objective, generator, source: str, condition: torch.Tensor, image: str) -> torch.Tensor:
    """One pass predicting every `image` token from the `source` tokens, decoded through each token's expected code
    (ImageTokenizer.decode_distribution): pixels in [0, 1], [B, 3, H, W]."""
    from polymodal.models.fourm import Tokens

    spec = objective.specs[image]
    ids, _ = given = generator.condition(source, condition)
    b, n = len(ids), spec.grid[0] * spec.grid[1]
    positions = torch.arange(n, device=ids.device).expand(b, -1)
    nothing = torch.zeros(b, n, dtype=torch.bool, device=ids.device)
    logits = objective.model({**generator.inputs({source: given}),
                              image: Tokens(torch.zeros_like(positions), positions, nothing)},
                             {image: Tokens(None, positions, ~nothing)})[image]
    probs = logits.float().softmax(-1).view(b, *spec.grid, -1)
    model, _ = decoder_of(objective, image)
    return _pixels01(model.decode_distribution(probs))


@torch.no_grad()
def image_from(objective, batches, source: str, image: str, mean_image: torch.Tensor, schedule: str,
               seed: int) -> dict:
    """PSNR of images generated from held-out `source` tokens (greedy MaskGIT/ROAR), of one pass decoded through
    each token's expected code (what squared error rewards), of the mean training image and of the tokenizer's
    decoding of the real image tokens, all against the real images; and, per image, how far each estimate is
    above the mean image (a paired comparison: the mean image is a strong baseline under squared error)."""
    from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule

    generator = FourMGenerator(objective, Sampling(temperature=0), Schedule.parse(schedule), seed)
    per_image: dict[str, list[torch.Tensor]] = {k: [] for k in ("generated", "expected_code", "mean_image",
                                                                "tokenizer_reconstruction")}
    for batch in batches:
        real = batch["rgb"].float() / 255
        generated = decode_images01(objective, image, generator.generate({source: batch[source]}, [image])[image])
        real = F.interpolate(real, size=generated.shape[-2:], mode="bilinear", antialias=True,
                             align_corners=False) if real.shape[-2:] != generated.shape[-2:] else real
        per_image["generated"].append(psnr(generated, real))
        per_image["expected_code"].append(psnr(expected_images01(objective, generator, source, batch[source], image),
                                               real))
        per_image["mean_image"].append(psnr(mean_image.expand_as(real), real))
        per_image["tokenizer_reconstruction"].append(psnr(decode_images01(objective, image, batch[image]), real))
    values = {k: torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64) for k, v in per_image.items()}
    seen = len(values["mean_image"])
    return {"from": source, "schedule": schedule, "sampling": "greedy", "images": seen,
            "psnr_db": {k: float(v.sum()) / max(seen, 1) for k, v in values.items()},
            "above_mean_image_db": {k: paired_gain(values[k] - values["mean_image"])
                                    for k in ("generated", "expected_code")}}


def paired_gain(differences: torch.Tensor) -> dict:
    """Mean of per-image differences with its 95% t-interval (none under two images), and the share above zero."""
    from scipy import stats

    ci95 = None
    if len(differences) > 1:
        interval = stats.ttest_1samp(differences.numpy(), 0.0).confidence_interval(0.95)
        ci95 = [float(interval.low), float(interval.high)]
    return {"mean": float(differences.mean()), "ci95": ci95, "share_above": float((differences > 0).double().mean())}
