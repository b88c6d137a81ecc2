"""Reading token shards (`polymodal data tokenize`): each set's vocabulary and grid, the checks every token array
passes, and the choice of one stored crop per sample.

A token set's stats.json records, under "tokens", the vocabulary size, the grid, the number of stored crops and
the tokenizer's fingerprint. An array of the wrong dtype or grid, or with ids outside the vocabulary, is skipped
and counted (`bad_tokens`) like any other bad input. Token grids are never resized: an image-like token array
holds N crops, and one is picked per sample (shared by all its token modalities, with its box in `crops`), from
the sample's augmentation RNG, so a new epoch (or a repeat) picks afresh and a resumed run picks the same.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.data.errors import ConfigError, SampleSkipped


@dataclass(frozen=True)
class TokenSpec:
    """What one token set holds (from its stats.json)."""

    vocab_size: int
    grid: tuple[int, int] | None  # None: a sequence
    crops: int
    fingerprint: str

    @classmethod
    def from_stats(cls, tokens: dict) -> TokenSpec:
        grid = tokens.get("grid")
        return cls(int(tokens["vocab_size"]), tuple(grid) if grid else None, int(tokens.get("crops", 1)),
                   str(tokens.get("fingerprint", "")))


def read_token_specs(folders: list[str]) -> dict[str, TokenSpec]:
    """modality name -> spec, for every folder that is a token set (a local stats.json with "tokens")."""
    specs: dict[str, TokenSpec] = {}
    for folder in folders:
        stats = Path(folder) / "stats.json"
        if not stats.is_file():
            continue
        try:
            tokens = json.loads(stats.read_text()).get("tokens")
        except ValueError as exc:
            raise ConfigError(f"{stats} is not valid JSON: {exc}") from None
        if tokens:
            specs[tokens["modality"]] = TokenSpec.from_stats(tokens)
    return specs


def token_folders(urls: list[str], join: list[str]) -> list[str]:
    """The folders whose stats.json may describe a token set: those of the source's shards, and the joined ones."""
    return sorted({os.path.dirname(u) for u in urls if "://" not in u}) + list(join)


def data_token_specs(shards: Any, join: list[str]) -> dict[str, TokenSpec]:
    """modality name -> spec of every token set a data config (its `shards` and `join`) reads."""
    from polymodal.data.shardlist import expand_entries

    urls = [url for entry in expand_entries(shards) for url in entry]
    return read_token_specs(token_folders(urls, join))


def check_tokens(name: str, array: np.ndarray, spec: TokenSpec | None) -> np.ndarray:
    """The array as int64 [crops, h, w] (image-like) or [length] (sequence); raises SampleSkipped('bad_tokens')."""
    if array.dtype.kind not in "ui":
        raise SampleSkipped("bad_tokens", f"{name}: dtype {array.dtype} is not an integer type")
    grid = spec.grid if spec else (None if array.ndim == 1 else tuple(array.shape[-2:]))
    if grid is None:
        if array.ndim != 1:
            raise SampleSkipped("bad_tokens", f"{name}: a sequence must be 1-D, got shape {array.shape}")
    else:
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or tuple(array.shape[1:]) != tuple(grid):
            raise SampleSkipped("bad_tokens", f"{name}: shape {array.shape} is not [crops, {grid[0]}, {grid[1]}]")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or (spec is not None and high >= spec.vocab_size):
            limit = f"[0, {spec.vocab_size})" if spec else "non-negative"
            raise SampleSkipped("bad_tokens", f"{name}: ids {low}..{high} are not all in {limit}")
    return array.astype(np.int64)


def pick_crop(sample: dict[str, Any], token_names: list[str], rng: random.Random) -> np.ndarray | None:
    """Replace each image-like token array [crops, h, w] (and `crops`) of `sample` by one crop, the same for all.
    Returns the chosen box (x0, y0, x1, y1, flip), which the sample's pixels then follow, or None."""
    grids = [n for n in token_names if n in sample and sample[n].ndim == 3]
    if not grids:
        return None
    counts = {len(sample[n]) for n in grids}
    if "crops" in sample:
        counts.add(len(sample["crops"]))
    if len(counts) != 1:
        raise SampleSkipped("bad_tokens", f"token sets hold different numbers of crops: {sorted(counts)}")
    choice = rng.randrange(counts.pop())
    for name in grids:
        sample[name] = torch.from_numpy(np.ascontiguousarray(sample[name][choice]))
    if "crops" not in sample:
        return None
    box = np.asarray(sample["crops"][choice], dtype=np.float32)
    sample["crops"] = torch.from_numpy(box)
    return box
