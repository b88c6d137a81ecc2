"""Pictures of MultiMAE's work (`log.images_every`, `polymodal predict`): each modality's input, its masked input and
the prediction, turned into RGB tiles of one size."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError
from polymodal.models.multimae import patchify, unpatchify


def class_colours(classes: int, device) -> torch.Tensor:
    """A fixed colour per class, [classes, 3] in [0, 1]; class 0 (background) black."""
    colours = torch.rand(classes, 3, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.2
    colours[0] = 0
    return colours.to(device)


def to_tiles(objective, name: str, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A modality's map (as the model takes it) -> RGB [B, 3, *size] in [0, 1]."""
    spec = objective.specs[name]
    if spec.classes:
        tiles = class_colours(spec.classes, x.device)[x.long().clamp(0, spec.classes - 1)].permute(0, 3, 1, 2)
    elif name == "rgb" and not objective.modality_configs[name].derive:
        tiles = ((x.float() * objective.std + objective.mean) / 255).clamp(0, 1)
    else:
        first = x.float().mean(1, keepdim=True) if x.shape[1] != 1 else x.float()
        lo = first.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = first.flatten(1).max(1).values.view(-1, 1, 1, 1)
        tiles = ((first - lo) / (hi - lo).clamp_min(1e-6)).expand(-1, 3, -1, -1)
    return F.interpolate(tiles, size=size, mode="nearest") if tuple(tiles.shape[-2:]) != tuple(size) else tiles


def prediction_map(objective, name: str, predicted: torch.Tensor, size: tuple[int, int],
                   truth: torch.Tensor | None) -> torch.Tensor:
    """The decoder's patches [B, N, values] as a map of `size`: class ids for class maps; for per-patch normalised
    targets (norm_mse), un-normalised with the `truth`'s patch statistics as MAE's pictures do (left normalised
    when there is no truth)."""
    spec, loss = objective.specs[name], objective.modality_configs[name].loss
    p = spec.patch_size
    if spec.classes:
        ids = predicted.unflatten(-1, (p * p, spec.classes)).argmax(-1).float()  # [B, N, p*p]
        return unpatchify(ids, p, size)[:, 0].long()
    if loss == "norm_mse" and truth is not None:
        patches = patchify(truth.float(), p)
        predicted = predicted * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
    return unpatchify(predicted.float(), p, size)


def read_map(path, spec, name: str, image_size: int | None) -> torch.Tensor:
    """An image file as a batch of one, as the data pipeline gives the modality: uint8 [1, 3, S, S] (3 channels),
    uint8 [1, 1, S, S] (one channel) or int64 class ids [1, S, S]; resized to `image_size` (nearest for classes)."""
    import numpy as np
    from PIL import Image

    if spec is None:
        raise ConfigError(f"--input {name}: not a modality of this model")
    with Image.open(path) as img:
        if spec.classes:
            img = img if img.mode in ("L", "P", "I", "I;16") else img.convert("L")
            resample = Image.NEAREST
        else:
            img = img.convert("RGB" if spec.channels == 3 else "L")
            resample = Image.BICUBIC
        if spec.channels not in (1, 3) and not spec.classes:
            raise ConfigError(f"--input {name}: a {spec.channels}-channel map cannot come from an image file")
        if image_size and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), resample)
        array = np.array(img)
    if spec.classes:
        return torch.from_numpy(array.astype(np.int64))[None]
    x = torch.from_numpy(array)
    return (x.permute(2, 0, 1) if x.dim() == 3 else x[None])[None].contiguous()


def save_prediction(objective, given: dict[str, torch.Tensor], predicted: dict[str, torch.Tensor],
                    path: Path) -> Path:
    """One row per sample: each given modality, then each prediction."""
    from torchvision.utils import save_image

    size = max((tuple(x.shape[-2:]) for x in [*given.values(), *predicted.values()]), key=lambda s: s[0])
    # Given maps as the model saw them (to_tiles shows other maps min-max scaled, so standardising changes nothing).
    columns = [to_tiles(objective, name, objective.model_map(name, x.to(objective.mean.device)), size)
               for name, x in given.items()]
    columns += [to_tiles(objective, name, x, size) for name, x in predicted.items()]
    rows = torch.stack(columns, 1).flatten(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.float().cpu(), str(path), nrow=len(columns), padding=2)
    return path


def hidden_pixels(objective, name: str, visible: torch.Tensor, shape) -> torch.Tensor:
    """bool [B, 1, H, W], True where the modality's patch was hidden from the encoder."""
    spec = objective.specs[name]
    if name not in objective.model.inputs:
        return torch.ones(shape[0], 1, *shape[-2:], dtype=torch.bool, device=visible.device)
    h, w = shape[-2] // spec.patch_size, shape[-1] // spec.patch_size
    grid = objective.visible_of(visible, name).reshape(-1, 1, h, w)
    return ~grid.repeat_interleave(spec.patch_size, 2).repeat_interleave(spec.patch_size, 3)


def draw(objective, maps: dict[str, torch.Tensor], visible: torch.Tensor, out: dict, path: Path) -> Path:
    from torchvision.utils import save_image

    size = max((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0])
    columns = []
    for name, x in maps.items():
        hidden = hidden_pixels(objective, name, visible, x.shape)
        hide = hidden[:, 0] if objective.specs[name].classes else hidden.expand_as(x)  # x's own shape
        columns += [to_tiles(objective, name, x, size)]
        grey_patches = F.interpolate(hidden.float(), size=size, mode="nearest").bool()
        columns += [torch.where(grey_patches, 0.5, to_tiles(objective, name, x.masked_fill(hide, 0), size))]
        if name in out["predictions"]:
            predicted = prediction_map(objective, name, out["predictions"][name], x.shape[-2:], x)
            columns += [to_tiles(objective, name, torch.where(hide, predicted, x.to(predicted.dtype)), size)]
        else:
            columns += [torch.zeros_like(columns[-1])]
    rows = torch.stack(columns, 1).flatten(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.float().cpu(), str(path), nrow=len(columns), padding=2)
    return path
