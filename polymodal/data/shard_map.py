"""Adding modalities to a shard set without rewriting it: read every source shard, write one shard per new set.

`polymodal data derive` (edges, palettes...) and `polymodal data tokenize` (token ids) are both a `ShardJob` run
by `map_shards`. As in ml-4m, each new modality is its own shard set, `OUT/<set>/<name>`, with the same shard
names and keys as the source, and the pipeline joins sets by key (`data.join`), so adding a modality never
touches the shards that exist.

How it runs:
- Loader workers read and decode the source shards (one worker per shard at a time); this process runs the
  batched work (a derivation, a tokenizer) and writes, or, for a job that sets `process_in_workers` (CPU work),
  the workers run it too and this process only writes. Samples keep their source order.
- Ranks split the shards (rank r takes every R-th), so `torchrun` spreads a job over nodes.
- The unit of resume is a shard: its outputs are written as `.tmp`, renamed when whole, and only then is
  `OUT/_progress/<name>.json` written. A job resumed after `kill -9` redoes the shards without a marker, and
  writes bytes identical to an uninterrupted run (fixed member order and mtime; every random choice is seeded by
  shard name and sample index, never by the order work happened in).
- Each set gets a `stats.json` once every shard is done (by whichever rank finishes last).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymodal.data.errors import ConfigError, SkipCounter, skip_reason, summarize
from polymodal.data.shardlist import expand_shards
from polymodal.data.tar_samples import RawSample, iter_shard
from polymodal.data.writer import ShardFile
from polymodal.distributed import Placement, placement
from polymodal.progress import progress_bar

log = logging.getLogger("polymodal.data")

JOB_FILE = "_job.json"
PROGRESS_DIR = "_progress"
Members = dict[str, bytes]  # extension (after the key) -> bytes


class ShardJob:
    """What a job does. Subclasses set `sets` and implement `decode` and `process`."""

    sets: tuple[str, ...] = ()
    batch_size: int = 64
    # Run `process` in the loader workers too (each with one torch thread), so CPU work spreads over processes
    # instead of torch's threads in this one; for CPU-bound jobs. This process then only writes.
    process_in_workers: bool = False

    def settings(self) -> dict:
        """Everything that changes the output; resuming with other settings is refused."""
        raise NotImplementedError

    def decode(self, raw: RawSample, rng: random.Random) -> Any:
        """One source sample -> what `process` takes (runs in loader workers). Raise SampleSkipped for bad input."""
        raise NotImplementedError

    def process(self, samples: list[Any]) -> list[dict[str, Members]]:
        """A batch of decoded samples -> for each, the members to write per set (a set left out: not written)."""
        raise NotImplementedError

    def set_info(self, name: str) -> dict:
        """Extra figures for a set's stats.json (a tokenizer's fingerprint, vocabulary, grid)."""
        return {}


def sample_rng(seed: int, shard: str, index: int) -> random.Random:
    """The random choices for one sample: a function of where it is, not of when it was processed."""
    return random.Random(f"{seed}:{shard}:{index}")


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


class _SourceShards(IterableDataset):
    """Loader workers: decode the samples of this rank's shards, a batch at a time, with the skips met."""

    def __init__(self, urls: list[str], job: ShardJob, seed: int, allow_pipe: bool):
        super().__init__()
        self.urls, self.job, self.seed, self.allow_pipe = urls, job, seed, allow_pipe

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.urls if info is None else self.urls[info.id::info.num_workers]
        for url in mine:
            name = shard_name(url)
            counter = SkipCounter(where=name)
            batch: list[tuple[str, Any]] = []
            for index, raw in iter_shard(url, counter, self.allow_pipe):
                try:
                    batch.append((raw["__key__"], self.job.decode(raw, sample_rng(self.seed, name, index))))
                except Exception as exc:  # one bad sample never stops the job
                    skip = skip_reason(exc)
                    counter.add(skip.reason, f"{url} key {raw['__key__']}: {skip.detail}")
                if len(batch) == self.job.batch_size:
                    yield self._batch(name, batch, done=False)
                    batch = []
            yield {**self._batch(name, batch, done=True), "skips": counter.as_dict()}

    def _batch(self, name: str, batch: list[tuple[str, Any]], done: bool) -> dict:
        if not self.job.process_in_workers:
            return {"shard": name, "samples": batch, "read": len(batch), "done": done}
        processed, failures = process_batch(self.job, batch, name)
        return {"shard": name, "processed": processed, "failures": dict(failures), "read": len(batch), "done": done}


def _unbatched(batch: Any) -> Any:
    return batch


class _OpenShard:
    """The output files of one source shard being written."""

    def __init__(self, out: Path, name: str, sets: tuple[str, ...]):
        self.name = name
        self.files = {s: ShardFile(out / s / name, compress=name.endswith("gz")) for s in sets}
        self.failures: Counter = Counter()
        self.samples = 0

    def close(self) -> dict:
        sizes = {s: f.close() for s, f in self.files.items()}
        return {"name": self.name, "samples": self.samples, "failures": dict(self.failures),
                "sets": {s: {"samples": self.files[s].samples, "bytes": sizes[s]} for s in self.files}}


class JobProgress:
    """`OUT/_job.json` (the settings) and `OUT/_progress/<shard>.json` (one per finished shard)."""

    def __init__(self, out: Path, job: ShardJob):
        self.out, self.job = out, job
        self.dir = out / PROGRESS_DIR

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def done(self, name: str) -> dict | None:
        """The record of a finished shard whose outputs are on disk as recorded, else None."""
        path = self.marker(name)
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        for s, figures in entry["sets"].items():
            file = self.out / s / name
            if not file.exists() or file.stat().st_size != figures["bytes"]:
                return None
        return entry

    def start(self, names: list[str], resume: bool, overwrite: bool) -> list[str]:
        """Check or record the settings; clear what this rank redoes. Returns the shards still to do."""
        # Through JSON, so tuples compare equal to the lists they were recorded as.
        settings = json.loads(json.dumps({"settings": self.job.settings(), "sets": list(self.job.sets)}))
        job_file = self.out / JOB_FILE
        if job_file.exists() and not overwrite:
            recorded = json.loads(job_file.read_text())
            if recorded != settings:
                raise ConfigError(f"{self.out} was written with other settings ({recorded['settings']}); resume "
                                  "with the same options, or pass --overwrite")
            finished = [n for n in names if self.marker(n).exists()]
            if finished and not resume:
                raise ConfigError(f"{self.out} already holds {len(finished)} finished shards of this job: pass "
                                  "--resume to continue it or --overwrite to start again")
        self.out.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(exist_ok=True)
        for s in self.job.sets:
            (self.out / s).mkdir(exist_ok=True)
        _write_atomic(job_file, json.dumps(settings, indent=1, sort_keys=True))
        todo = []
        for name in names:
            if resume and not overwrite and self.done(name) is not None:
                continue
            self.marker(name).unlink(missing_ok=True)
            for s in self.job.sets:
                for stale in (self.out / s / name, self.out / s / f"{name}.tmp"):
                    stale.unlink(missing_ok=True)
            todo.append(name)
        return todo

    def finish(self, entry: dict) -> None:
        _write_atomic(self.marker(entry["name"]), json.dumps(entry, sort_keys=True))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_set_stats(out: Path, job: ShardJob, names: list[str], source: str) -> dict | None:
    """Every set's stats.json, once every shard of the job is done (else None)."""
    progress = JobProgress(out, job)
    entries = [progress.done(n) for n in names]
    if any(e is None for e in entries):
        return None
    failures: Counter = Counter()
    for e in entries:
        failures.update(e["failures"])
    summary = {"source": source, "shards": len(names), "samples_read": sum(e["samples"] for e in entries),
               "failures": dict(failures), "settings": job.settings(), "sets": {}}
    for s in job.sets:
        stats = {"set": s, "source": source, "shards": len(names),
                 "samples": sum(e["sets"][s]["samples"] for e in entries),
                 "bytes": sum(e["sets"][s]["bytes"] for e in entries), **job.set_info(s)}
        _write_atomic(out / s / "stats.json", json.dumps(stats, indent=1, sort_keys=True))
        (out / s / "nshards.txt").write_text(f"{len(names)}\n")
        summary["sets"][s] = stats
    _write_atomic(out / "stats.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _expected_samples(urls: list[str], shards: int) -> int | None:
    """About how many samples `shards` of the source's shards hold, from the writer's stats.json beside them (for
    the progress bar)."""
    folders = {os.path.dirname(u) for u in urls}
    if len(folders) != 1:
        return None
    try:
        stats = json.loads((Path(folders.pop()) / "stats.json").read_text())
        return round(int(stats["samples"]) * shards / int(stats["shards"]))
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return None


def map_shards(spec: str | list[str], out_dir: str | Path, job: ShardJob, *, resume: bool = False,
               overwrite: bool = False, workers: int = 2, seed: int = 0, allow_pipe: bool = False,
               where: Placement | None = None, show_progress: bool = True, desc: str = "shards") -> dict:
    """Run `job` over the shards of `spec` into `out_dir`. Returns this rank's figures (and `stats` when the
    whole job is done)."""
    where = where or placement()
    urls = expand_shards(spec, allow_pipe)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError(f"{spec!r}: shard names repeat across folders; an added set mirrors the source's shard "
                          "names, so run the job once per folder")
    out = Path(out_dir)
    progress = JobProgress(out, job)
    mine = list(range(where.rank, len(urls), where.world_size))
    todo = set(progress.start([names[i] for i in mine], resume, overwrite))
    skipped_done = len(mine) - len(todo)
    if skipped_done:
        log.info("resuming: %d of this rank's %d shards are already done", skipped_done, len(mine))
    work = [urls[i] for i in mine if names[i] in todo]
    started = time.monotonic()
    bar = progress_bar(total=_expected_samples(urls, len(work)), unit="sample", desc=desc,
                       disable=not show_progress)
    failures: Counter = Counter()
    written = 0
    if work:
        loader = DataLoader(_SourceShards(work, job, seed, allow_pipe), batch_size=None, collate_fn=_unbatched,
                            num_workers=min(workers, len(work)))
        open_shards: dict[str, _OpenShard] = {}
        try:
            for item in loader:
                if item["shard"] not in open_shards:
                    open_shards[item["shard"]] = _OpenShard(out, item["shard"], job.sets)
                shard = open_shards[item["shard"]]
                written += _write_batch(job, shard, item)
                bar.update(item["read"])
                if item["done"]:
                    shard.failures.update(item["skips"])
                    failures.update(shard.failures)
                    progress.finish(open_shards.pop(item["shard"]).close())
                    bar.set_postfix_str(summarize(dict(failures)))
        finally:
            bar.close()
    stats = write_set_stats(out, job, names, str(spec))
    return {"rank": where.rank, "shards": len(work), "shards_already_done": skipped_done, "samples": written,
            "failures": dict(failures), "seconds": round(time.monotonic() - started, 2), "stats": stats}


def process_batch(job: ShardJob, samples: list[tuple[str, Any]], where: str
                  ) -> tuple[list[tuple[str, dict[str, Members]]], Counter]:
    """(key, members per set) for a batch, and the skips; a batch that fails is redone sample by sample so only
    the bad one is lost."""
    failures: Counter = Counter()
    if not samples:
        return [], failures
    try:
        return [(key, out) for (key, _), out in zip(samples, job.process([s for _, s in samples]))], failures
    except Exception:
        results = []
        for key, sample in samples:
            try:
                results.append((key, job.process([sample])[0]))
            except Exception as exc:
                skip = skip_reason(exc)
                failures[skip.reason] += 1
                log.warning("skipped (%s) %s key %s: %s", skip.reason, where, key, skip.detail)
        return results, failures


def _write_batch(job: ShardJob, shard: _OpenShard, item: dict) -> int:
    """Write one batch from the workers: processed there (`process_in_workers`) or processed here now."""
    if "processed" in item:
        results, failures = item["processed"], Counter(item["failures"])
    else:
        results, failures = process_batch(job, item["samples"], shard.name)
    shard.failures.update(failures)
    for key, per_set in results:
        for s, members in per_set.items():
            shard.files[s].add(key, members)
        shard.samples += 1
    return len(results)
