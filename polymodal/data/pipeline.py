"""The reading pipeline: shards -> decoded, augmented, batched samples, with a resumable position.

    loader = ShardLoader(DataConfig(shards=["data/{0..9}.tar"], modalities=["rgb", "caption"]))
    for batch in loader:  # dict: "rgb" uint8 [B,3,H,W], "caption" list[str], "__key__"/"__url__" list[str]
        ...
    state = loader.state_dict()   # JSON-serialisable; save it with the checkpoint
    loader.load_state_dict(state) # in a fresh process: continues with exactly the batches that came next

Work is split explicitly: rank r of R with W loader workers is global worker r*W + w of R*W. In epoch mode
each global worker reads its own shards; in resampled mode each draws shards with its own seed. Batches are
built inside the workers and carry the worker's position; the loader keeps the position of the last batch
it handed out from each worker (not of batches still prefetched), so a saved state never skips data.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymodal import modalities
from polymodal.data.collate import collate
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError, SampleSkipped, SkipCounter, skip_reason, summarize
from polymodal.data.shardlist import expand_entries, missing_local, weights_per_shard
from polymodal.data.stream import WorkerStream, augment_rng
from polymodal.data.tar_samples import RawSample
from polymodal.data.token_data import TokenSpec, check_tokens, pick_crop, read_token_specs, token_folders
from polymodal.data.transforms import ImageTransform
from polymodal.distributed import Placement, placement

log = logging.getLogger("polymodal.data")

STATE_VERSION = 1
# Text to token ids: one callable for every text modality, or one per modality name (a caption and a gloss may
# use different vocabularies); text modalities without one stay strings.
Tokenizer = Callable[[str], Any]
Tokenizers = Union[Tokenizer, dict[str, Tokenizer]]


class SampleDecoder:
    """Raw sample (extension -> bytes) to a training sample (modality -> value), through the registry."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizers | None = None,
                 token_specs: dict[str, TokenSpec] | None = None):
        self.wanted = [(modalities.get(n), True) for n in cfg.modalities]
        self.wanted += [(modalities.get(n), False) for n in cfg.optional_modalities]
        self.token_specs = token_specs or {}
        self.token_names = [m.name for m, _ in self.wanted if m.tokens]
        if self.token_names and "crops" not in [m.name for m, _ in self.wanted]:
            self.wanted.append((modalities.get("crops"), False))  # the boxes of stored token crops
        self.max_pixels = cfg.max_image_pixels
        self.transform = ImageTransform(size=cfg.image_size, train=cfg.augment, scale=tuple(cfg.crop_scale),
                                        ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, fast_decode=cfg.fast_decode)
        self.tokenizers: dict[str, Tokenizer] = (
            dict(tokenizer) if isinstance(tokenizer, dict)
            else {m.name: tokenizer for m, _ in self.wanted} if tokenizer is not None else {})

    def __call__(self, raw: RawSample, rng) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw["__url__"]}
        found = [(modality, modality.find(raw), required) for modality, required in self.wanted]
        # Checked before any decoding: data lacking a required modality is skipped cheaply.
        for modality, ext, required in found:
            if ext is None and required:
                raise SampleSkipped("missing_modality", f"no {modality.name} member "
                                    f"(looked for .{', .'.join(modality.extensions)})")
        images = {}
        for modality, ext, _ in found:
            if ext is None:
                continue
            value = modality.decode(raw[ext], ext, self.max_pixels)
            if modality.tokens:
                sample[modality.name] = check_tokens(modality.name, value, self.token_specs.get(modality.name))
            elif modality.geometry:
                images[modality.name] = (modality, value)
            elif isinstance(value, str) and modality.name in self.tokenizers:
                sample[modality.name] = torch.as_tensor(self.tokenizers[modality.name](value))
            else:
                sample[modality.name] = modality.to_tensor(value) if modality.to_tensor else value
        crop = None
        if self.token_names:
            # A stored token crop is picked first: pixels of the sample are then cut with the same box.
            crop = pick_crop(sample, self.token_names, rng)
            for name in self.token_names:
                if isinstance(sample.get(name), np.ndarray):
                    sample[name] = torch.from_numpy(sample[name])
        sample.update(self.transform(images, rng, crop))
        return sample


def _worker_identity(offset: int) -> tuple[int, int]:
    """(logical worker id, workers per rank). Physical worker i plays logical (i + offset) % W."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + offset) % info.num_workers, info.num_workers


class ShardDataset(IterableDataset):
    """What runs inside each loader worker; configured by ShardLoader before every `iter()`."""

    def __init__(self, cfg: DataConfig, urls: list[str], where: Placement, tokenizer: Tokenizers | None,
                 weights: list[float] | None = None, token_specs: dict[str, TokenSpec] | None = None):
        super().__init__()
        self.cfg, self.urls, self.where = cfg, urls, where
        self.weights = weights  # resampled draw weight per url (None: uniform)
        self.decoder = SampleDecoder(cfg, tokenizer, token_specs)
        self.epoch = 0
        self.worker_offset = 0
        self.resume: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        logical, per_rank = _worker_identity(self.worker_offset)
        worker = self.where.rank * per_rank + logical
        total = self.where.world_size * per_rank
        saved = self.resume.get(logical)
        counter = SkipCounter(where=f"rank {self.where.rank} worker {logical}")
        stream = WorkerStream(self.urls, seed=cfg.seed, epoch=self.epoch, worker=worker, total_workers=total,
                              resampled=cfg.resampled, shuffle_shards=cfg.shuffle_shards,
                              buffer_size=cfg.shuffle_buffer, buffer_initial=cfg.shuffle_initial,
                              counter=counter, allow_pipe=cfg.allow_pipe, weights=self.weights, joins=cfg.join,
                              repeats=cfg.repeats)
        if saved is not None:
            if saved.get("done"):
                return
            counter.load(saved["skips"])
            stream.restore(saved["stream"])

        def position(done: bool) -> dict:
            return {"worker": logical, "state": {"stream": stream.state(), "skips": counter.as_dict(), "done": done}}

        def emit(samples: list[dict], done: bool = False) -> dict:
            return {**collate(samples), "__state__": position(done)}

        pending: list[dict] = []
        try:
            for pos, idx, raw, repeat in stream.repeated():
                try:
                    pending.append(self.decoder(raw, augment_rng(cfg.seed, self.epoch, worker, pos, idx, repeat)))
                except Exception as exc:  # one bad sample never stops the run
                    skip = skip_reason(exc)
                    counter.add(skip.reason, f"{raw['__url__']} key {raw['__key__']}: {skip.detail}")
                    stream.judge(pos, usable=False)
                    stream.drop_repeats()  # its other repeats would fail the same way
                    continue
                stream.judge(pos, usable=True)
                if len(pending) == cfg.batch_size:
                    yield emit(pending)
                    pending = []
        except ConfigError as exc:
            # Handed to the loader, which raises it in the main process: raised here, a worker's error would
            # arrive re-raised by torch with the worker's traceback inside its message.
            yield {"__error__": str(exc), "__state__": position(False)}
            return
        if pending and not cfg.drop_last:
            yield emit(pending, done=True)
        else:
            # No batch left, but the end of this worker's epoch and its skip counts must still reach the loader.
            yield {"__state__": position(True)}


def check_config(cfg: DataConfig, urls: list[str], where: Placement) -> int:
    """Validate at start; returns the number of loader workers per rank to use. Raises ConfigError."""
    for name in [*cfg.modalities, *cfg.optional_modalities]:
        modalities.get(name)
    if not cfg.modalities:
        raise ConfigError("data.modalities is empty: name at least one modality, e.g. data.modalities=[rgb,caption]")
    if cfg.batch_size < 1:
        raise ConfigError(f"data.batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.repeats < 1:
        raise ConfigError(f"data.repeats must be at least 1, got {cfg.repeats}")
    missing_joins = [folder for folder in cfg.join if "://" not in folder and not os.path.isdir(folder)]
    if missing_joins:
        raise ConfigError(f"data.join: {', '.join(missing_joins)} is not a folder (each joined set is a folder of "
                          "shards named like the source's, e.g. what `polymodal data derive` wrote)")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {cfg.num_workers}")
    missing = missing_local(urls)
    if missing:
        log.warning("%d of %d shards do not exist (first: %s); they will be skipped and counted",
                    len(missing), len(urls), missing[0])
    if cfg.shard_weights and not cfg.resampled:
        raise ConfigError("data.shard_weights weight resampled draws; epoch mode reads every shard once: set "
                          "data.resampled=true, or drop the weights")
    workers = cfg.num_workers
    if not cfg.resampled:
        if len(urls) < where.world_size:
            raise ConfigError(
                f"{len(urls)} shards cannot feed {where.world_size} ranks in epoch mode (each rank needs at least "
                "one shard): write more, smaller shards (polymodal data shards --samples-per-shard N), or set "
                "data.resampled=true")
        per_rank = len(urls) // where.world_size
        if max(workers, 1) > per_rank:
            log.warning("%d shards for %d ranks x %d workers in epoch mode: using %d workers per rank so none "
                        "sits idle (more shards, or data.resampled=true, would allow more)",
                        len(urls), where.world_size, workers, per_rank)
            workers = min(workers, per_rank)
    return workers


def _already_collated(batch: dict) -> dict:
    """Batches are collated in the workers; the default would walk every batch (and its state) once more."""
    return batch


class ShardLoader:
    """Iterate batches from shards; `state_dict()` / `load_state_dict()` save and restore the exact position.

    Iterating again after a `break` continues where the last handed-out batch left off. In epoch mode a
    completed pass moves to the next epoch; `set_epoch` picks one explicitly.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizers | None = None, where: Placement | None = None):
        self.cfg = cfg
        self.where = where or placement()
        entries = expand_entries(cfg.shards, allow_pipe=cfg.allow_pipe)
        self.urls = [url for entry in entries for url in entry]
        self.num_workers = check_config(cfg, self.urls, self.where)
        weights = weights_per_shard(entries, cfg.shard_weights) if cfg.shard_weights else None
        # Token sets describe themselves in their stats.json: the source's folders and the joined ones.
        self.token_specs = read_token_specs(token_folders(self.urls, cfg.join))
        self.dataset = ShardDataset(cfg, self.urls, self.where, tokenizer, weights, self.token_specs)
        self.epoch = 0
        self._states: dict[int, dict] = {}
        self._next_worker = 0
        self._skips_before_epoch: dict[str, int] = {}
        self._last_log = 0.0
        self._logged_total = 0

    # -- iteration ------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._states, self._next_worker = epoch, {}, 0

    def _dataloader(self) -> DataLoader:
        self.dataset.epoch = self.epoch
        self.dataset.resume = dict(self._states)
        self.dataset.worker_offset = self._next_worker
        workers = self.num_workers
        return DataLoader(self.dataset, batch_size=None, collate_fn=_already_collated, num_workers=workers,
                          pin_memory=self.cfg.pin_memory,
                          prefetch_factor=self.cfg.prefetch_factor if workers else None,
                          persistent_workers=False)

    def __iter__(self) -> Iterator[dict]:
        per_rank = max(self.num_workers, 1)
        for batch in self._dataloader():
            if "__error__" in batch:
                raise ConfigError(batch["__error__"])
            meta = batch.pop("__state__")
            self._states[meta["worker"]] = meta["state"]
            self._next_worker = (meta["worker"] + 1) % per_rank
            self._maybe_log()
            if len(batch):
                yield batch
        self._end_epoch()

    def _end_epoch(self) -> None:
        self._skips_before_epoch = self.skip_counts()
        self.epoch += 1
        self._states, self._next_worker = {}, 0
        self._log(force=True)

    # -- skipped-sample accounting ----------------------------------------------------------------------------

    def skip_counts(self) -> dict[str, int]:
        """Samples, members and shards skipped so far on this rank, by reason (all epochs)."""
        total = dict(self._skips_before_epoch)
        for state in self._states.values():
            for reason, n in state["skips"].items():
                total[reason] = total.get(reason, 0) + n
        return total

    def _maybe_log(self) -> None:
        if time.monotonic() - self._last_log > 30:
            self._log()

    def _log(self, force: bool = False) -> None:
        counts = self.skip_counts()
        total = sum(counts.values())
        if total != self._logged_total or (force and total):
            log.warning("data (rank %d): %s", self.where.rank, summarize(counts))
            self._logged_total = total
        self._last_log = time.monotonic()

    # -- position -------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"rank": self.where.rank, "world_size": self.where.world_size, "num_workers": self.num_workers,
                "seed": self.cfg.seed, "resampled": self.cfg.resampled, "num_shards": len(self.urls),
                "shard_weights": self.dataset.weights, "repeats": self.cfg.repeats}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch,
                "next_worker": self._next_worker, "skips_before_epoch": dict(self._skips_before_epoch),
                "workers": {str(k): v for k, v in self._states.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._identity()
        state = {"repeats": 1, **state}  # saved before data.repeats existed
        different = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if different:
            what = ", ".join(f"{k} was {old} now {new}" for k, (old, new) in different.items())
            raise ConfigError(f"cannot resume the data position: {what}. Resume with the same ranks, workers, seed "
                              "and shards, or start the data stream afresh")
        self.epoch = state["epoch"]
        self._next_worker = state["next_worker"]
        self._skips_before_epoch = dict(state["skips_before_epoch"])
        self._states = {int(k): v for k, v in state["workers"].items()}
