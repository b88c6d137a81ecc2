"""The reading pipeline's settings (the `data:` section of an experiment config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from polymodal.modalities import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class DataConfig:
    # Shard spec: brace pattern, glob, folder, fsspec URL, '::'-joined, or a list of those (Any: a string or a list).
    shards: Any = field(default_factory=list)
    # Folders of shard sets joined to `shards` by key (each holds shards of the same names): modalities added by
    # `polymodal data derive` or `polymodal data tokenize` without rewriting the source.
    join: list[str] = field(default_factory=list)
    # Modalities every sample must have (others are skipped and counted), and ones used when present.
    modalities: list[str] = field(default_factory=lambda: ["rgb", "caption"])
    optional_modalities: list[str] = field(default_factory=list)
    batch_size: int = 64
    # Loader processes per rank. In epoch mode every (rank, worker) needs at least one shard.
    num_workers: int = 2
    # True: draw shards with replacement forever (no epochs). False: each epoch reads every shard once.
    resampled: bool = False
    # Resampled mode: one weight per entry of `shards` (a list); each shard of an entry is drawn with that relative
    # weight, so a sample's rate is its entry's weight (uniform by default; every shard is read whole).
    shard_weights: list[float] = field(default_factory=list)
    seed: int = 0
    # Hand out each decoded sample this many times in a row, each with fresh augmentation (and masking in the
    # objective): fewer reads and decodes per training sample. Resume covers the repeat in progress.
    repeats: int = 1
    shuffle_shards: bool = True
    # Samples held for shuffling per worker (0: stream order). Yielding starts once it holds shuffle_initial.
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    # Image-like modalities: output side (None keeps decoded sizes), train-time augmentation, crop params.
    image_size: Optional[int] = 224
    augment: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    # Decode JPEGs at 1/2..1/8 scale when the crop allows it (much faster for big photos).
    fast_decode: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Keep the last, smaller batch of an epoch.
    drop_last: bool = False
    # 'pipe:' shard URLs run shell commands; refused unless this is true.
    allow_pipe: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 4
