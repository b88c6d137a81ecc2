"""Image features of a whole dataset, computed on every rank at once and gathered, optionally cached on disk.

Each rank encodes its own shards (the data pipeline's epoch-mode split) and the results are all-gathered, so
every rank ends with the whole dataset in one canonical order (sorted by shard URL, then sample key): the same
features and metrics whether one rank or many computed them. With fewer shards than ranks the extra ranks idle.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.data.shardlist import expand_shards
from polymodal.distributed import Placement

log = logging.getLogger("polymodal")


@dataclass
class Features:
    """Per-sample image features with what came with them, in canonical order."""

    image: torch.Tensor  # float32 [N, D], L2-normalised
    labels: torch.Tensor | None = None  # int64 [N]
    captions: list[str] | None = None  # raw caption text (several captions: one per line)
    ids: list[str] = field(default_factory=list)  # "url#key"


@dataclass
class RunOptions:
    batch_size: int = 256
    num_workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    progress: bool = True
    # False: this process works alone even inside a process group (e.g. rank 0 evaluating after training).
    distributed: bool = True


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def world_for(opts: RunOptions) -> Placement:
    import torch.distributed as dist

    if opts.distributed and dist.is_available() and dist.is_initialized():
        return Placement(dist.get_rank(), dist.get_world_size())
    return Placement()


def gather_objects(local: dict[str, Any], world: Placement) -> list[dict[str, Any]]:
    """Every rank's `local`, in rank order, on every rank."""
    if world.world_size == 1:
        return [local]
    import torch.distributed as dist

    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, local)
    return parts


def cache_path(cache_dir: str | Path, model_id: str, shards: str, modalities: list[str], preprocessing: dict,
               opts: RunOptions) -> Path:
    """The cache file of one extraction. Its key holds everything that changes the features: the model
    (`model_id`: its spec, weights file and seed), the shards (paths, sizes, times), what is read with the images,
    the encoder's preprocessing (`Encoder.preprocessing()`: resolution, mean and std, dtypes), and the precision
    and device type the encoder runs in (bf16 features are not fp32 features)."""
    urls = expand_shards(shards)
    stamp = [(u, Path(u).stat().st_mtime_ns, Path(u).stat().st_size) if Path(u).exists() else (u,) for u in urls]
    key = {"version": 2, "model": model_id, "shards": stamp, "modalities": modalities, "preprocessing": preprocessing,
           "precision": opts.precision, "device": torch.device(opts.device).type}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"features-{digest}.pt"


@torch.no_grad()
def extract_features(encoder, shards: str, opts: RunOptions, *, labels: bool = False, captions: bool = False,
                     cache: Path | None = None) -> Features:
    """Features of every sample in `shards` (and its labels / captions), the same on every rank."""
    if cache is not None and cache.is_file():
        log.info("features from cache %s", cache)
        return Features(**torch.load(cache, map_location="cpu", weights_only=False))
    world = world_for(opts)
    urls = expand_shards(shards)
    readers = min(world.world_size, len(urls))
    modalities = ["rgb"] + (["label"] if labels else []) + (["caption"] if captions else [])
    local: dict[str, Any] = {"ids": [], "image": [], "labels": [], "captions": []}
    if world.rank < readers:
        device = torch.device(opts.device)
        cfg = DataConfig(shards=shards, modalities=modalities, batch_size=opts.batch_size,
                         num_workers=opts.num_workers, shuffle_shards=False, shuffle_buffer=0,
                         image_size=encoder.image_size, augment=False)
        loader = ShardLoader(cfg, where=Placement(world.rank, readers))
        total = count_samples(urls) if opts.progress and world.rank == 0 else None
        bar = _progress(total, f"encoding {Path(urls[0]).parent.name or shards}") if opts.progress and \
            world.rank == 0 else None
        for batch in loader:
            with autocast(device, opts.precision):
                feats = encoder.encode_image(batch["rgb"].to(device, non_blocking=True))
            local["image"].append(feats.float().cpu())
            local["ids"] += [f"{u}#{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
            if labels:
                local["labels"].append(batch["label"])
            if captions:
                local["captions"] += batch["caption"]
            if bar is not None:
                bar.update(len(batch["__key__"]) * readers)  # the other ranks move at about the same pace
        if bar is not None:
            bar.close()
    for key in ("image", "labels"):
        local[key] = torch.cat(local[key]) if local[key] else None
    parts = [p for p in gather_objects(local, world) if p["ids"]]
    if not parts:
        raise ConfigError(f"no samples with {', '.join(modalities)} could be read from {shards} (see the skipped "
                          "samples logged above; `polymodal data inspect` shows what the shards hold)")
    ids = [i for p in parts for i in p["ids"]]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    features = Features(image=torch.cat([p["image"] for p in parts])[index], ids=[ids[i] for i in order])
    if labels:
        features.labels = torch.cat([p["labels"] for p in parts])[index]
    if captions:
        all_captions = [c for p in parts for c in p["captions"]]
        features.captions = [all_captions[i] for i in order]
    if cache is not None and world.rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(features.__dict__, tmp)
        tmp.replace(cache)
    return features


def count_samples(urls: list[str]) -> int | None:
    """From the writer's stats.json beside the shards, when there is one (no extra pass over the data)."""
    stats = Path(urls[0]).parent / "stats.json"
    if len(set(Path(u).parent for u in urls)) != 1:
        return None
    try:
        written = json.loads(stats.read_text())
        # Only when the URLs are all the folder's shards (not e.g. one shard of four).
        return int(written["samples"]) if int(written.get("shards", len(urls))) == len(urls) else None
    except (OSError, ValueError, KeyError):
        return None


def _progress(total: int | None, desc: str):
    from polymodal.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="img", leave=False)
