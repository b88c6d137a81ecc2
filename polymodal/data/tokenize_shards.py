"""`polymodal data tokenize`: token ids of image-like and text modalities, written as shard sets of their own.

Each tokenized modality `m` becomes `OUT/tok_m/<shard name>` with one `<key>.tok_m.npy` per sample (the same
shard names and keys as the source), so the pipeline joins it by key (`data.join`) and can train on tokens
without the pixels. The dtype follows the vocabulary: uint16 up to 65,536 codes (a 64,000-code FSQ fits; ml-4m's
int16 stops at 32,767), int32 above.

Image-like modalities are stored as `--crops N` crops per sample, `[N, h, w]`, with the crop boxes beside them
(`<key>.crops.npy`, `[N, 5]`: x0, y0, x1, y1 as fractions of the image, and 1.0 where flipped). As in 4M, crop 0
is the centre crop and the others are random resized crops (seeded by shard name and sample index), one box per
sample shared by all its image-like modalities so they stay aligned; training picks one stored crop per epoch.
Each set's stats.json records the tokenizer's fingerprint, vocabulary and grid; reading tokens back checks them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from polymodal import modalities
from polymodal.data.errors import ConfigError, SampleSkipped
from polymodal.data.shard_map import ShardJob
from polymodal.data.tar_samples import RawSample
from polymodal.data.transforms import center_box, crop_resize, random_resized_box
from polymodal.modalities import DEFAULT_MAX_IMAGE_PIXELS, TOKEN_PREFIX, npy_bytes
from polymodal.tokenizers.registry import load_image_tokenizer


@dataclass
class TokenizeOptions:
    crops: int = 1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    batch_size: int = 128
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Sequence modalities: append [EOS] (4M's sequences end with it).
    eos: bool = True


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def load_text_tokenizer(spec: str):
    """A WordPiece vocabulary folder/file (`polymodal tokenizer train-text`), `open_clip_bpe:<model>` (also
    `open_clip:<model>`) for open_clip's BPE, or any `name:...` of the tokenizer registry."""
    from polymodal.tokenizers import registry

    if spec.startswith("open_clip:"):
        spec = "open_clip_bpe:" + spec.split(":", 1)[1]
    tokenizer = registry.load(spec)
    if tokenizer.grid(32) is not None:
        raise ConfigError(f"--text ...={spec}: that is an image tokenizer (use --tokenizer)")
    return tokenizer


class TokenizeJob(ShardJob):
    """Image tokenizers by source modality (`rgb=RUN`), text tokenizers by source modality (`caption=VOCAB`)."""

    def __init__(self, images: dict[str, str], texts: dict[str, str], opts: TokenizeOptions, seed: int = 0,
                 device: str = "cpu"):
        if not images and not texts:
            raise ConfigError("nothing to tokenize: give --tokenizer MODALITY=RUN_DIR and/or --text MODALITY=VOCAB")
        if opts.crops < 1:
            raise ConfigError(f"--crops must be at least 1, got {opts.crops}")
        self.opts, self.seed = opts, seed
        self.device = torch.device(device)
        # On the CPU the loader workers encode too, one torch thread each: faster than torch's threads here.
        self.process_in_workers = self.device.type == "cpu"
        self.image_models = {}
        for name, run in images.items():
            self._check_modality(name, image=True)
            objective, size = load_image_tokenizer(run)
            if size is None:
                raise ConfigError(f"--tokenizer {name}={run}: the export does not record its image size")
            # Channels-last convolutions: about 1.5x faster on CPU (oneDNN) with the same ids, and no slower on GPUs.
            objective.to(self.device, memory_format=torch.channels_last)
            if objective.config.modality != name:
                raise ConfigError(f"--tokenizer {name}={run}: that tokenizer was trained on {objective.config.modality!r}")
            self.image_models[name] = (objective, size, run)
        sizes = {size for _, size, _ in self.image_models.values()}
        self.text_models = {}
        for name, spec in texts.items():
            self._check_modality(name, image=False)
            self.text_models[name] = (load_text_tokenizer(spec), spec)
        self.batch_size = opts.batch_size
        self.sets = tuple(TOKEN_PREFIX + name for name in [*self.image_models, *self.text_models])
        self.sizes = sizes

    @staticmethod
    def _check_modality(name: str, image: bool) -> None:
        modality = modalities.get(name)
        if image and not modality.geometry:
            raise ConfigError(f"--tokenizer {name}=...: {name!r} is not an image-like modality (use --text)")
        if not image and modality.geometry:
            raise ConfigError(f"--text {name}=...: {name!r} is image-like (use --tokenizer)")

    # -- settings and stats

    def settings(self) -> dict:
        return {"options": {**asdict(self.opts), "batch_size": None}, "seed": self.seed,
                "tokenizers": {TOKEN_PREFIX + n: o.tokenizer_model.fingerprint
                               for n, (o, _, _) in self.image_models.items()}
                | {TOKEN_PREFIX + n: t.fingerprint for n, (t, _) in self.text_models.items()}}

    def set_info(self, name: str) -> dict:
        source = name[len(TOKEN_PREFIX):]
        if source in self.image_models:
            objective, size, run = self.image_models[source]
            tok = objective.tokenizer_model
            info = {"modality": name, "source_modality": source, "tokenizer": run, "fingerprint": tok.fingerprint,
                    "vocab_size": tok.vocab_size, "grid": list(tok.grid(size)), "image_size": size,
                    "crops": self.opts.crops}
        else:
            tok, spec = self.text_models[source]
            info = {"modality": name, "source_modality": source, "tokenizer": spec, "fingerprint": tok.fingerprint,
                    "vocab_size": tok.vocab_size, "grid": None, "eos": self.opts.eos}
        info["dtype"] = token_dtype(info["vocab_size"]).name
        return {"tokens": info}

    # -- per sample (loader workers): decode and crop

    def boxes(self, width: int, height: int, rng: random.Random) -> list[tuple[float, float, float, float, bool]]:
        size = max(self.sizes)
        out = [(*center_box(width, height, size, size), False)]
        for _ in range(self.opts.crops - 1):
            box = random_resized_box(width, height, tuple(self.opts.crop_scale), tuple(self.opts.crop_ratio), rng)
            out.append((*box, rng.random() < self.opts.hflip))
        return out

    def decode(self, raw: RawSample, rng: random.Random) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        boxes = None
        for name, (_, size, _) in self.image_models.items():
            modality = modalities.get(name)
            ext = modality.find(raw)
            if ext is None:
                continue
            img = modality.decode(raw[ext], ext, self.opts.max_image_pixels)
            if boxes is None:
                boxes = self.boxes(*img.size, rng)
            # As numpy: sent to this process pickled in one piece, where torch would give every sample's tensor
            # a shared-memory segment of its own (slower than the crop itself for small images).
            sample[name] = torch.stack([crop_resize(img, box[:4], (size, size), modality, box[4])
                                        for box in boxes]).numpy()
        if boxes is not None:
            sample["crops"] = np.array(boxes, dtype=np.float32)
        for name in self.text_models:
            modality = modalities.get(name)
            ext = modality.find(raw)
            if ext is not None:
                sample[name] = modality.decode(raw[ext], ext)
        if not sample:
            raise SampleSkipped("missing_modality", f"none of {', '.join([*self.image_models, *self.text_models])}")
        return sample

    # -- per batch (this process): encode

    @torch.inference_mode()
    def process(self, samples: list[dict[str, Any]]) -> list[dict[str, dict[str, bytes]]]:
        out: list[dict[str, dict[str, bytes]]] = [{} for _ in samples]
        for name, (objective, _, _) in self.image_models.items():
            rows = [i for i, s in enumerate(samples) if name in s]
            if not rows:
                continue
            pixels = torch.from_numpy(np.concatenate([samples[i][name] for i in rows]))  # [rows * crops, C, S, S]
            inputs = objective.inputs({name: pixels.to(self.device)})
            if inputs.dim() == 4:  # images; class maps are ids [B, H, W]
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            ids = objective.tokenizer_model.encode(inputs)
            ids = ids.view(len(rows), self.opts.crops, *ids.shape[1:]).cpu().numpy()
            dtype = token_dtype(objective.tokenizer_model.vocab_size)
            for row, grid in zip(rows, ids):
                out[row][TOKEN_PREFIX + name] = {f"{TOKEN_PREFIX}{name}.npy": npy_bytes(grid.astype(dtype)),
                                                 "crops.npy": npy_bytes(samples[row]["crops"])}
        for name, (tok, _) in self.text_models.items():
            dtype = token_dtype(tok.vocab_size)
            eos = getattr(tok, "eos_id", None) if self.opts.eos else None
            for row, sample in enumerate(samples):
                if name in sample:
                    ids = tok.encode(sample[name]).numpy()
                    if eos is not None:
                        ids = np.append(ids, eos)
                    out[row][TOKEN_PREFIX + name] = {f"{TOKEN_PREFIX}{name}.npy": npy_bytes(ids.astype(dtype))}
        return out
