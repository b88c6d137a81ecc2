"""The embedding loop: loader workers read and decode whole parts while the main process encodes, and each part is
written as soon as its last batch is encoded.

Work is split by part: rank r takes every R-th unfinished part, and its loader worker w every W-th of those. A
batch never mixes parts, so a part's rows (and, on a given machine, its embeddings bit for bit) do not depend on
how many ranks or workers ran, nor on whether the run was resumed.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymodal.data.config import DataConfig
from polymodal.data.errors import SampleSkipped, SkipCounter, skip_reason
from polymodal.data.tar_samples import iter_shard
from polymodal.distributed import Placement
from polymodal.embed.inputs import Inputs, Part
from polymodal.embed.layout import write_part
from polymodal.eval.features import autocast

log = logging.getLogger("polymodal")

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class EmbedOptions:
    what: tuple[str, ...] = ("img",)  # "img" and/or "text"
    batch_size: int = 256
    num_workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"  # autocast: fp32 | bf16 | fp16
    dtype: str = "float16"  # of the written embeddings
    normalize: bool = True
    progress: bool = True


class _SkipList(SkipCounter):
    """A skip counter that also keeps every skip's detail, for the part's skipped list."""

    def __init__(self, url: str):
        super().__init__(where=url)
        self.records: list[dict[str, Any]] = []

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        super().add(reason, detail, n)
        self.records.append({"url": self.where, "key": None, "reason": reason, "error": detail})


def shard_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a shard sample: key, shard, caption (.txt), label (.cls), and a .json's scalar fields."""
    fields: dict[str, Any] = {"key": raw["__key__"], "shard": raw["__url__"]}
    try:
        if "txt" in raw:
            fields["caption"] = raw["txt"].decode("utf-8")
        if "cls" in raw:
            fields["label"] = int(raw["cls"].decode().strip())
        extra = json.loads(raw["json"]) if "json" in raw else None
    except UnicodeDecodeError as exc:
        raise SampleSkipped("bad_text", str(exc)) from None
    except ValueError as exc:  # a .cls that is not an integer, a .json that does not parse
        raise SampleSkipped("bad_label" if "cls" in raw and "label" not in fields else "transform_failed",
                            str(exc)) from None
    if isinstance(extra, dict):
        for name, value in extra.items():
            if name not in fields:
                scalar = value is None or isinstance(value, (str, int, float, bool))
                fields[name] = value if scalar else json.dumps(value)
    return fields


class PartReader(IterableDataset):
    """Yields batches of whole parts: {"part", "last", "fields", "rgb"?, "tokens"?, "skipped"}."""

    def __init__(self, inputs: Inputs, parts: list[Part], what: tuple[str, ...], batch_size: int,
                 image_size: int, tokenizer):
        super().__init__()
        from polymodal.data.pipeline import SampleDecoder

        self.inputs, self.parts, self.what, self.batch_size = inputs, parts, what, batch_size
        self.tokenizer = tokenizer
        self.decoder = SampleDecoder(DataConfig(shards="-", modalities=["rgb"], image_size=image_size,
                                                augment=False)) if "img" in what else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[worker::workers]:
            yield from self._batches(part)

    def _rows(self, part: Part, skipped: list[dict]) -> Iterator[dict[str, Any]]:
        """(fields, caption) per readable row; unreadable ones go to `skipped`."""
        if part.url is not None:
            counter = _SkipList(part.url)
            for _, raw in iter_shard(part.url, counter):
                skipped += counter.records
                counter.records = []
                try:
                    item = {"fields": shard_fields(raw)}
                    if self.decoder is not None:
                        item["rgb"] = self.decoder(raw, random.Random(0))["rgb"]
                except Exception as exc:  # one bad sample never stops the run
                    skip = skip_reason(exc)
                    skipped.append({"url": part.url, "key": raw["__key__"], "reason": skip.reason,
                                    "error": skip.detail})
                    continue
                yield item
            skipped += counter.records
            return
        start, stop = part.rows
        for offset, row in enumerate(self.inputs.table.slice(start, stop - start).to_pylist()):
            key = str(row[self.inputs.key_column]) if self.inputs.key_column else str(start + offset)
            caption = row.get(self.inputs.caption_column)
            fields = {"key": key, **{k: v for k, v in row.items() if k != "key"}}
            if not isinstance(caption, str):
                skipped.append({"url": self.inputs.description, "key": key, "reason": "missing_modality",
                                "error": f"row {start + offset}: caption is {type(caption).__name__}, not text"})
                continue
            fields["caption"] = caption
            yield {"fields": fields}

    def _batches(self, part: Part) -> Iterator[dict[str, Any]]:
        rows, skipped = [], []
        for item in self._rows(part, skipped):
            if "text" in self.what:
                caption = item["fields"].get("caption")
                if caption is None:
                    skipped.append({"url": part.url, "key": item["fields"]["key"], "reason": "missing_modality",
                                    "error": "no caption (.txt) to embed"})
                    continue
                item["tokens"] = torch.as_tensor(self.tokenizer(caption))
            rows.append(item)
            if len(rows) == self.batch_size:
                yield self._emit(part, rows, skipped, last=False)
                rows = []
                skipped.clear()  # in place: _rows keeps appending to this list
        yield self._emit(part, rows, skipped, last=True)

    def _emit(self, part: Part, rows: list[dict], skipped: list[dict], last: bool) -> dict[str, Any]:
        batch = {"part": part.index, "last": last, "fields": [r["fields"] for r in rows], "skipped": list(skipped)}
        for name in ("rgb", "tokens"):
            if rows and name in rows[0]:
                batch[name] = torch.stack([r[name] for r in rows])
        return batch


@torch.no_grad()
def embedding_dims(encoder, what: tuple[str, ...], device: torch.device) -> dict[str, int]:
    """Width of each kind of embedding (an empty part still writes a [0, D] array)."""
    dims = {}
    if "img" in what:
        size = encoder.image_size
        dims["img"] = encoder.encode_image(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)).shape[1]
    if "text" in what:
        tokens = torch.as_tensor(encoder.tokenizer()("a")).unsqueeze(0).to(device)
        dims["text"] = encoder.encode_text(tokens).shape[1]
    return dims


@torch.no_grad()
def embed_parts(encoder, inputs: Inputs, pending: list[Part], out: Path, opts: EmbedOptions,
                where: Placement) -> dict[str, Any]:
    """Encode this rank's share of the `pending` parts (every rank passes the same list) into `out`; returns
    counts for the summary."""
    device = torch.device(opts.device)
    mine = pending[where.rank::where.world_size]
    stats = {"parts_written": 0, "rows": 0, "skipped": 0, "seconds": 0.0}
    if not mine:
        return stats
    dims = embedding_dims(encoder, opts.what, device)
    dtype = DTYPES[opts.dtype]
    reader = PartReader(inputs, mine, opts.what, opts.batch_size, encoder.image_size,
                        encoder.tokenizer() if "text" in opts.what else None)
    workers = min(opts.num_workers, len(mine))
    loader = DataLoader(reader, batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    bar = _progress(_expected_rows(inputs, mine), where) if opts.progress else None
    buffers: dict[int, dict[str, list]] = {}
    t0 = time.perf_counter()
    for batch in loader:
        buf = buffers.setdefault(batch["part"], {"img": [], "text": [], "fields": [], "skipped": []})
        if batch["fields"]:
            with autocast(device, opts.precision):
                if "img" in opts.what:
                    emb = encoder.encode_image(batch["rgb"].to(device, non_blocking=True), normalize=opts.normalize)
                    buf["img"].append(emb.float().cpu().numpy().astype(dtype))
                if "text" in opts.what:
                    emb = encoder.encode_text(batch["tokens"].to(device), normalize=opts.normalize)
                    buf["text"].append(emb.float().cpu().numpy().astype(dtype))
            buf["fields"] += batch["fields"]
        buf["skipped"] += batch["skipped"]
        stats["rows"] += len(batch["fields"])
        stats["skipped"] += len(batch["skipped"])
        if bar is not None:
            bar.update(len(batch["fields"]) + len(batch["skipped"]))
        if batch["last"]:
            buf = buffers.pop(batch["part"])
            arrays = {k: np.concatenate(buf[k]) if buf[k] else np.zeros((0, dims[k]), dtype) for k in opts.what}
            write_part(out, batch["part"], arrays, buf["fields"], buf["skipped"])
            stats["parts_written"] += 1
    if bar is not None:
        bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _expected_rows(inputs: Inputs, parts: list[Part]) -> int | None:
    if inputs.is_table:
        return sum(p.rows[1] - p.rows[0] for p in parts)
    from polymodal.eval.features import count_samples

    total = count_samples([p.url for p in inputs.parts])  # of all parts: this rank's share is about proportional
    return None if total is None else round(total * len(parts) / len(inputs.parts))


def _progress(total: int | None, where: Placement):
    from polymodal.progress import progress_bar

    desc = "embedding" + (f" (rank {where.rank})" if where.world_size > 1 else "")
    return progress_bar(total=total, desc=desc, unit="sample", position=where.rank, leave=False)
