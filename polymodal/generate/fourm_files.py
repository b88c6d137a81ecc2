"""`polymodal generate` for 4M runs, from files and text to PNG grids and text: conditions are tokenized with the
tokenizers the run's modalities name (`objective.modalities.<name>.tokenizer`), the generated tokens decoded with
them. The same from Python: `generate_to_files(run, {"caption": "a red apple"}, ["edges", "rgb"], out)`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from polymodal.data.errors import ConfigError
from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule


def resolve(objective, name: str) -> str:
    """A modality of the run by its name, or without its `tok_` prefix (`caption` for `tok_caption`)."""
    for candidate in (name, f"tok_{name}"):
        if candidate in objective.specs:
            return candidate
    raise ConfigError(f"modality {name!r}: this model was trained on {', '.join(objective.specs)}")


def tokenizer_of(objective, name: str):
    from polymodal.tokenizers.registry import load

    path = objective.modality_configs[name].tokenizer
    if not path:
        raise ConfigError(f"modality {name!r}: the run names no tokenizer for it (objective.modalities.{name}."
                          "tokenizer), so its tokens cannot be made from files or text, nor turned back")
    return load(path)


def encode_condition(objective, name: str, value: str, samples: int) -> torch.Tensor | tuple:
    """Token ids of one condition, repeated for `samples` rows: text for a sequence; an image file, or a .npy of
    token ids, for an image-like modality."""
    spec = objective.specs[name]
    if not spec.is_sequence and value.endswith(".npy"):
        ids = torch.from_numpy(np.load(value, allow_pickle=False)).long()
        ids = ids[0] if ids.dim() == 3 else ids  # a stored [crops, h, w] array: its first (centre) crop
        return ids.expand(samples, -1, -1)
    tokenizer = tokenizer_of(objective, name)
    if spec.is_sequence:
        ids = torch.cat([tokenizer.encode(value), torch.tensor([objective.config.eos_id])])
        return ids.expand(samples, -1), torch.full((samples,), len(ids))
    if not Path(value).is_file():
        raise ConfigError(f"condition {name}={value!r}: no such image file")
    from PIL import Image

    from polymodal.tokenizers.registry import load_image_tokenizer

    image_objective, size = load_image_tokenizer(objective.modality_configs[name].tokenizer)
    with Image.open(value) as picture:
        grey = image_objective.config.classes or image_objective.config.channels == 1
        picture = picture.convert("L" if grey else "RGB")
        if size:
            picture = picture.resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(picture).copy())
    x = x.permute(2, 0, 1) if x.dim() == 3 else x[None]
    with torch.no_grad():
        ids = tokenizer.encode(image_objective.inputs({image_objective.config.modality: x[None]}))
    return ids.expand(samples, -1, -1)


def decode_images(objective, name: str, ids: torch.Tensor) -> np.ndarray:
    """uint8 [B, H, W, 3] pictures of image tokens."""
    pictures = tokenizer_of(objective, name).decode(ids)
    if pictures.dim() == 3:  # class ids: spread them over the grey levels
        pictures = (pictures.float() / max(int(pictures.max()), 1) * 2 - 1)[:, None]
    pictures = ((pictures.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    if pictures.shape[1] == 1:
        pictures = pictures.expand(-1, 3, -1, -1)
    return pictures.permute(0, 2, 3, 1).numpy()


def decode_texts(objective, name: str, ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    tokenizer = tokenizer_of(objective, name)
    eos = objective.config.eos_id
    return [tokenizer.decode([int(i) for i in row[:n] if int(i) != eos]) for row, n in zip(ids, lengths)]


def write_grid(rows: list[list[np.ndarray]], path: Path) -> Path:
    """One row per sample, its pictures side by side (each scaled to the largest)."""
    from PIL import Image

    size = max(max(p.shape[0] for p in row) for row in rows)
    gap = 2
    width = len(rows[0]) * (size + gap) - gap
    canvas = Image.new("RGB", (width, len(rows) * (size + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            tile = Image.fromarray(picture).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (c * (size + gap), r * (size + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def generate_to_files(run: str | Path, conditions: dict[str, str], targets: list[str], out: str | Path,
                      sampling: Sampling = Sampling(), schedule: Schedule = Schedule(), samples: int = 4,
                      seed: int = 0) -> dict:
    """Generate `targets` (in order, chained) from `conditions` (modality -> text or file) for `samples` rows;
    write OUT/generated.png (conditions that are images, then generated images, one row per sample) and
    OUT/generated.json (texts and settings). Returns what the JSON holds."""
    from polymodal.pretrain.export import load_exported

    run = Path(run)
    weights = run / "model.safetensors" if run.is_dir() else run
    if not weights.is_file():
        raise ConfigError(f"{run}: no {weights} (a run folder with model.safetensors, or an exported file)")
    objective = load_exported(weights)
    if objective.name != "4m":
        raise ConfigError(f"{run} is a {objective.name!r} run; `polymodal generate` needs a 4m run")
    given = {resolve(objective, k): v for k, v in conditions.items()}
    wanted = [resolve(objective, t) for t in targets]
    encoded = {name: encode_condition(objective, name, value, samples) for name, value in given.items()}
    generated = FourMGenerator(objective, sampling, schedule, seed).generate(encoded, wanted, samples)
    out = Path(out)
    columns, texts = [], {}
    for name, value in [*encoded.items(), *generated.items()]:
        if objective.specs[name].is_sequence:
            ids, lengths = value
            texts[name] = decode_texts(objective, name, ids, lengths)
        else:
            columns.append(decode_images(objective, name, value))
    result = {"run": str(run), "conditions": given, "targets": wanted, "texts": texts, "samples": samples,
              "seed": seed, "schedule": f"{schedule.kind}:{schedule.steps}", "sampling": vars(sampling)}
    if columns:
        result["grid"] = str(write_grid([list(row) for row in zip(*columns)], out / "generated.png"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "generated.json").write_text(json.dumps(result, indent=1))
    return result


__all__ = ["generate_to_files"]
