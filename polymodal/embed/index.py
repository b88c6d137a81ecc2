"""faiss indexes over an embedding folder, and nearest-neighbour lookup back to the metadata rows.

Inner product on the stored vectors: cosine similarity for normalised embeddings (the default of `polymodal
embed`). Index row order is part order then row order, recorded beside the index so a hit maps back to
metadata_{N}.parquet row i.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from polymodal.data.errors import ConfigError
from polymodal.embed.layout import emb_path, metadata_path, part_numbers

INDEX_NAMES = {"img": "image", "text": "text"}
EXACT_BELOW = 100_000  # rows; above this the default index is IVF (approximate, much faster to search)


def index_path(out: Path, kind: str) -> Path:
    return out / f"{INDEX_NAMES[kind]}.index"


def _parts_path(out: Path, kind: str) -> Path:
    return out / f"{INDEX_NAMES[kind]}.index.parts.json"


def default_factory(rows: int) -> str:
    """Exact search for small collections; an inverted file with ~4 sqrt(n) lists (faiss's guideline) above."""
    return "Flat" if rows < EXACT_BELOW else f"IVF{int(4 * math.sqrt(rows))},Flat"


def build_index(out: Path, kind: str = "img", factory: str | None = None, train_rows: int = 200_000) -> dict:
    """Write OUT/{image,text}.index from the finished parts; returns what was built."""
    import faiss

    parts = part_numbers(out, kind)
    if not parts:
        raise ConfigError(f"{out} has no finished {INDEX_NAMES[kind]} embeddings ({kind}_emb/): run polymodal embed "
                          "first")
    counts = [int(np.load(emb_path(out, kind, p), mmap_mode="r").shape[0]) for p in parts]
    dim = int(np.load(emb_path(out, kind, parts[0]), mmap_mode="r").shape[1])
    rows = sum(counts)
    factory = factory or default_factory(rows)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"faiss cannot build index {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    if not index.is_trained:
        # A uniform sample of rows across parts, as training an IVF quantiser on the first part alone would bias it.
        rng = np.random.default_rng(0)
        share = min(1.0, train_rows / max(rows, 1))
        sample = [np.asarray(np.load(emb_path(out, kind, p), mmap_mode="r")[rng.random(n) < share], np.float32)
                  for p, n in zip(parts, counts)]
        index.train(np.concatenate(sample))
    for part in parts:  # one part in memory at a time
        index.add(np.ascontiguousarray(np.load(emb_path(out, kind, part)), dtype=np.float32))
    faiss.write_index(index, str(index_path(out, kind)))
    _parts_path(out, kind).write_text(json.dumps({"parts": parts, "rows": counts, "factory": factory}) + "\n")
    return {"index": str(index_path(out, kind)), "rows": rows, "dim": dim, "factory": factory, "parts": len(parts)}


def search(out: Path, query: np.ndarray, kind: str = "img", k: int = 10, nprobe: int = 16) -> list[dict[str, Any]]:
    """The k nearest rows to `query` [D]: each hit's score, part, row and metadata fields."""
    import faiss
    import pyarrow.parquet as pq

    path = index_path(out, kind)
    if not path.is_file():
        raise ConfigError(f"no {path}: build it with `polymodal index {out}`")
    index = faiss.read_index(str(path))
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    layout = json.loads(_parts_path(out, kind).read_text())
    if query.shape[-1] != index.d:
        raise ConfigError(f"the query embedding has {query.shape[-1]} dimensions, the index {index.d}: search with "
                          "the model that made the embeddings")
    scores, ids = index.search(np.asarray(query, np.float32).reshape(1, -1), k)
    starts = np.cumsum([0] + layout["rows"])
    hits = []
    for score, row in zip(scores[0], ids[0]):
        if row < 0:  # fewer than k rows
            continue
        slot = int(np.searchsorted(starts, row, side="right") - 1)
        part, local = layout["parts"][slot], int(row - starts[slot])
        fields = pq.read_table(metadata_path(out, part)).slice(local, 1).to_pylist()[0]
        hits.append({"score": float(score), "part": part, "row": local, **fields})
    return hits
