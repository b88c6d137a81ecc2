"""Writing WebDataset shards from an importer's records: parallel encoding, size limits, resume, stats.

Records are encoded (image checked by a full decode, optionally resized and re-encoded) in a process pool, in
order, and written by this process into `{i}.tar` shards, each closed when it reaches `samples_per_shard`
samples or `max_shard_bytes`. A shard is written as `{i}.tar.tmp` and renamed when complete, and a line is
appended to `_progress.jsonl` (records consumed, counters), so an interrupted conversion resumes after the last
complete shard and redoes only the partial one. Shard bytes are reproducible: fixed member order and mtime.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from polymodal.data.errors import ConfigError, SampleSkipped, summarize
from polymodal.data.sources import Record, Source
from polymodal import modalities
from polymodal.modalities import DEFAULT_MAX_IMAGE_PIXELS, load_pixels, open_image, to_rgb
from polymodal.progress import progress_bar

log = logging.getLogger("polymodal.data")

PROGRESS_FILE = "_progress.jsonl"
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
EXT_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MEMBER_MODALITY = {"txt": "caption", "cls": "label", "json": "json"}

# A generic subset of the CLIP paper's ImageNet prompt templates, in CLIP_benchmark's '{c}' form.
DEFAULT_TEMPLATES = [
    "a photo of a {c}.", "a bad photo of a {c}.", "a low resolution photo of a {c}.", "a cropped photo of a {c}.",
    "a close-up photo of a {c}.", "a bright photo of a {c}.", "a dark photo of a {c}.", "a blurry photo of a {c}.",
    "a photo of the small {c}.", "a photo of the large {c}.", "a drawing of a {c}.", "art of the {c}.",
]


@dataclass
class WriterOptions:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    resize: int | None = None  # longest side in pixels; images are only ever shrunk
    image_format: str = "keep"  # keep | jpg | png | webp
    quality: int = 95
    workers: int = 1
    compress: bool = False  # gzip each shard ({i}.tar.gz)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------------------------------
# Encoding one record (runs in pool processes).


def encode_image(value: bytes | np.ndarray, opts: WriterOptions) -> tuple[str, bytes]:
    """(extension, bytes) of the image as it goes into the shard. Raises SampleSkipped for bad images."""
    if isinstance(value, np.ndarray):
        array = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value  # [H,W,1] -> grey
        img, source_ext, original = Image.fromarray(array), None, None
    else:
        img = load_pixels(open_image(value, max_pixels=opts.max_image_pixels))
        source_ext, original = FORMAT_EXT.get(img.format), value
    target = (source_ext or "png") if opts.image_format == "keep" else opts.image_format
    too_big = opts.resize is not None and max(img.size) > opts.resize
    if not too_big and target == source_ext:
        return target, original  # unchanged: no re-encoding loss
    if too_big:
        img = img.copy()
        img.thumbnail((opts.resize, opts.resize), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if target == "jpg" and img.mode not in ("RGB", "L"):
        img = to_rgb(img)
    elif target in ("png", "webp") and img.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16"):
        img = img.convert("RGBA")
    out = io.BytesIO()
    save_args = {"quality": opts.quality} if target in ("jpg", "webp") else {}
    img.save(out, format=EXT_FORMAT[target], **save_args)
    return target, out.getvalue()


# Record fields that are not modalities.
RECORD_FIELDS = ("source", "meta", "error")


def encode_member(name: str, value: Any) -> tuple[str, bytes]:
    """(extension, bytes) of any registered modality's value, through the registry: its first extension, with
    bytes as given, text as UTF-8, integers as ASCII, arrays as .npy or (2-D uint8/uint16, for .png) a PNG."""
    modality = modalities.get(name)
    ext = modality.extensions[0]
    if isinstance(value, (bytes, bytearray)):
        return ext, bytes(value)
    if isinstance(value, str):
        return ext, value.encode("utf-8")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return ext, str(int(value)).encode("ascii")
    if isinstance(value, np.ndarray):
        if ext.endswith("png") and value.ndim == 2 and value.dtype in (np.uint8, np.uint16):
            return ext, modalities.png_bytes(value)
        if ext.endswith("png"):
            ext = next((e for e in modality.extensions if e.endswith("npy")), None)
            if ext is None:
                raise SampleSkipped("bad_array", f"{name}: a {value.dtype} array of shape {value.shape} is not an "
                                    "8/16-bit 2-D map, and the modality has no .npy form")
        return ext, modalities.npy_bytes(value)
    raise SampleSkipped("transform_failed", f"{name}: cannot write a {type(value).__name__}")


def encode_record(record: Record, opts: WriterOptions) -> dict[str, bytes]:
    """Shard members (extension -> bytes) for one record, without the key: the image checked and re-encoded as
    asked, every other modality through the registry (`encode_member`), and a .json of the record's metadata."""
    if "error" in record:
        raise record["error"]
    members: dict[str, bytes] = {}
    for name, value in record.items():
        if name in RECORD_FIELDS:
            continue
        if name == "rgb":
            ext, data = encode_image(value, opts)
        elif name == "label":
            ext, data = "cls", str(int(value)).encode("ascii")
        else:
            ext, data = encode_member(name, value)
        members[ext] = data
    meta = {"source": record.get("source"), **record.get("meta", {})}
    members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
    return members


def member_modality(ext: str) -> str:
    """The modality a written member holds (for the counts in stats.json)."""
    if ext in MEMBER_MODALITY:
        return MEMBER_MODALITY[ext]
    if ext in FORMAT_EXT.values():
        return "rgb"
    return next((n for n in modalities.names() if ext in modalities.get(n).extensions), ext)


_POOL_OPTIONS: WriterOptions | None = None


def _pool_init(opts: WriterOptions) -> None:
    global _POOL_OPTIONS
    _POOL_OPTIONS = opts


def _encode_in_pool(record: Record) -> tuple[str, Any, str]:
    """('ok', members, source) or ('skip', reason, detail): exceptions must not cross the pool boundary."""
    try:
        return "ok", encode_record(record, _POOL_OPTIONS), record.get("source", "")
    except SampleSkipped as exc:
        return "skip", exc.reason, f"{record.get('source')}: {exc.detail}"
    except Exception as exc:  # an importer or Pillow bug must not kill a long conversion
        return "skip", "corrupt_image", f"{record.get('source')}: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------------
# Writing tar files.


def _member_size(n: int) -> int:
    return 512 + (n + 511) // 512 * 512


class ShardFile:
    """One shard being written: `{i}.tar.tmp`, renamed to `{i}.tar` by `close()`.

    `compress` gzips the whole tar (`{i}.tar.gz`): tar headers and padding are most of a shard of small
    images, and the reader streams .tar.gz like .tar. The gzip header gets mtime 0 so bytes are reproducible.
    """

    def __init__(self, path: Path, compress: bool = False):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self.file, mtime=0) if compress else None
        self.tar = tarfile.open(fileobj=self.gzip or self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 1024  # end-of-archive blocks

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
            self.bytes += _member_size(len(data))
        self.samples += 1

    def close(self) -> int:
        self.tar.close()
        if self.gzip is not None:
            self.gzip.close()
        self.file.close()
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return size


# ---------------------------------------------------------------------------------------------------------------
# The conversion.


class Progress:
    """`_progress.jsonl`: one line per finished shard with everything needed to continue after it."""

    def __init__(self, shard_dir: Path, settings: dict):
        self.path = shard_dir / PROGRESS_FILE
        self.settings = settings

    def load(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if not lines:
            return []
        if lines[0].get("settings") != self.settings:
            raise ConfigError(f"{self.path.parent} was written with other settings ({lines[0].get('settings')}); "
                              "resume with the same options, or use --overwrite")
        shards = lines[1:]
        # Trust only shards that are on disk with the size recorded.
        good = []
        for entry in shards:
            file = self.path.parent / entry["name"]
            if not file.exists() or file.stat().st_size != entry["bytes"]:
                break
            good.append(entry)
        return good

    def start(self, kept: list[dict]) -> None:
        with open(self.path, "w") as f:
            f.write(json.dumps({"settings": self.settings}) + "\n")
            for entry in kept:
                f.write(json.dumps(entry) + "\n")

    def append(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _clear_outputs(shard_dir: Path, keep: set[str]) -> None:
    for file in shard_dir.iterdir():
        if file.name in keep:
            continue
        if file.name.endswith((".tar", ".tar.gz", ".tmp")) or file.name in ("stats.json", "nshards.txt", PROGRESS_FILE):
            file.unlink()


def write_metadata(dataset_dir: Path, shard_dir: Path, source: Source, stats: dict,
                   templates: list[str] | None) -> None:
    """stats.json, nshards.txt and CLIP_benchmark's dataset files."""
    (shard_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (shard_dir / "nshards.txt").write_text(f"{stats['shards']}\n")
    if source.classnames:
        (dataset_dir / "classnames.txt").write_text("\n".join(source.classnames) + "\n")
        (dataset_dir / "zeroshot_classification_templates.txt").write_text(
            "\n".join(templates or DEFAULT_TEMPLATES) + "\n")
    elif stats["modalities"].get("caption"):
        (dataset_dir / "dataset_type.txt").write_text("retrieval\n")


def ordered_map(pool: ProcessPoolExecutor, fn, items: Iterator, in_flight: int) -> Iterator:
    """pool.map with a bounded queue: results in input order, never more than `in_flight` records in memory.

    Executor.map would read the whole source up front, and multiprocessing.Pool.imap hangs forever when a worker
    dies; here a dead worker surfaces as BrokenProcessPool.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _records_after(source: Source, start: int) -> Iterator[Record]:
    for i, record in enumerate(source.records()):
        if i >= start:
            yield record


def _nothing_written(source: Source, records: int, failures: Counter, first_failure: dict[str, str]) -> str:
    """Why a conversion wrote no sample at all: its top skip reason, an example, where the inputs came from."""
    if not failures:
        return f"wrote no samples: the source gave {records} records"
    ranked = failures.most_common()
    counts = ", ".join(f"{reason}={n}" for reason, n in ranked)
    top = ranked[0][0]
    example = f"; first {top}: {first_failure[top]}" if top in first_failure else ""
    hint = source.failure_hint()
    return f"wrote no samples: all {records} records were skipped ({counts}{example})" + (f". {hint}" if hint else "")


def write_shards(source: Source, out_dir: str | Path, opts: WriterOptions, *, split: str | None = None,
                 resume: bool = False, overwrite: bool = False, templates: list[str] | None = None,
                 settings: dict | None = None, show_progress: bool = True) -> dict:
    """Convert `source` into shards under `out_dir` (or `out_dir/split`). Returns the stats written."""
    if opts.samples_per_shard < 1:
        raise ConfigError("--samples-per-shard must be at least 1")
    if opts.image_format not in ("keep", *EXT_FORMAT):
        raise ConfigError(f"--image-format must be keep, jpg, png or webp, not {opts.image_format!r}")
    dataset_dir = Path(out_dir)
    shard_dir = dataset_dir / split if split else dataset_dir
    shard_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(shard_dir, {**asdict(opts), "split": split, **(settings or {}), "workers": None})
    existing = sorted(p.name for p in shard_dir.iterdir() if p.name.endswith((".tar", ".tar.gz")))
    kept: list[dict] = []
    if resume:
        kept = progress.load()
    elif existing and not overwrite:
        raise ConfigError(f"{shard_dir} already holds {len(existing)} shards: pass --resume to continue an "
                          "interrupted conversion or --overwrite to start again")
    _clear_outputs(shard_dir, {e["name"] for e in kept})
    progress.start(kept)

    last = kept[-1] if kept else {"records": 0, "total_samples": 0, "total_bytes": 0, "failures": {},
                                  "modalities": {}}
    consumed, written, total_bytes = last["records"], last["total_samples"], last["total_bytes"]
    failures, found = Counter(last["failures"]), Counter(last["modalities"])
    first_failure: dict[str, str] = {}  # reason -> detail of its first record (logged, and quoted if all fail)
    if kept:
        log.info("resuming after %d finished shards (%d records done)", len(kept), consumed)
    shard_no = len(kept)
    shard: ShardFile | None = None

    def finish_shard():
        nonlocal shard, total_bytes
        size = shard.close()
        total_bytes += size
        progress.append({"name": shard.path.name, "samples": shard.samples, "bytes": size, "records": consumed,
                         "failures": dict(failures), "modalities": dict(found),
                         "total_samples": written, "total_bytes": total_bytes})
        shard = None

    records = _records_after(source, consumed)
    pool = None
    if opts.workers > 1:
        pool = ProcessPoolExecutor(opts.workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_pool_init, initargs=(opts,))
        results = ordered_map(pool, _encode_in_pool, records, in_flight=opts.workers * 64)
    else:
        _pool_init(opts)
        results = map(_encode_in_pool, records)
    started = time.monotonic()
    finished = False
    bar = progress_bar(total=source.length, initial=consumed, unit="rec", desc=f"shards -> {shard_dir}",
                       disable=not show_progress)
    try:
        for status, payload, detail in results:
            consumed += 1
            bar.update(1)
            if status == "skip":
                if failures[payload] == 0:
                    log.warning("skipped (%s): %s", payload, detail)
                    first_failure[payload] = detail
                failures[payload] += 1
                continue
            if shard is None:
                suffix = ".tar.gz" if opts.compress else ".tar"
                shard = ShardFile(shard_dir / f"{shard_no}{suffix}", opts.compress)
                shard_no += 1
            shard.add(f"{written:09d}", payload)
            written += 1
            for ext in payload:
                found[member_modality(ext)] += 1
            if shard.samples >= opts.samples_per_shard or shard.bytes >= opts.max_shard_bytes:
                finish_shard()
                bar.set_postfix_str(f"shards={shard_no} {summarize(dict(failures))}")
        if shard is not None:
            finish_shard()
        finished = True
    finally:
        bar.close()
        if pool is not None:
            # After a clean finish, wait for the workers: shutdown(wait=False) leaves the pool's manager thread to
            # interpreter exit, where CPython writes to its closed wake-up pipe ("Bad file descriptor" on stderr).
            pool.shutdown(wait=finished, cancel_futures=not finished)
    if written == 0:
        raise ConfigError(_nothing_written(source, consumed, failures, first_failure))
    stats = {"source": str(settings.get("source")) if settings else None, "samples": written,
             "records_read": consumed, "shards": shard_no, "bytes": total_bytes, "failures": dict(failures),
             "modalities": dict(found), "classes": len(source.classnames) if source.classnames else 0,
             "seconds": round(time.monotonic() - started, 2), "options": asdict(opts)}
    write_metadata(dataset_dir, shard_dir, source, stats, templates)
    return stats
