"""What `polymodal embed` reads, cut into numbered parts: one part per shard, or per slice of a caption table.

Parts are the unit of work (one worker encodes a whole part), of output (one file of each kind per part) and of
resumption (a part is redone whole or skipped whole). Numbering depends only on the input, so every rank, and
every rerun, agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymodal.data.errors import ConfigError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Part:
    index: int
    url: str | None = None  # a shard
    rows: tuple[int, int] | None = None  # [start, stop) of the caption table


@dataclass
class Inputs:
    parts: list[Part]
    description: str  # for embed_info.json: the resolved input
    table: Any = None  # pyarrow.Table of a caption file
    caption_column: str | None = None
    key_column: str | None = None

    @property
    def is_table(self) -> bool:
        return self.table is not None


def is_table_file(spec: str) -> bool:
    return Path(spec).is_file() and spec.lower().endswith(TABLE_SUFFIXES)


def read_table(path: str):
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet as pq

    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(path)
        if lower.endswith(".csv"):
            return pyarrow.csv.read_csv(path)
        return pyarrow.json.read_json(path)  # JSON lines
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise ConfigError(f"cannot read caption file {path}: {exc}") from None


def _pick_column(table, given: str | None, candidates: tuple[str, ...], what: str, required: bool) -> str | None:
    names = table.column_names
    if given is not None:
        if given not in names:
            raise ConfigError(f"{what} column {given!r} is not in the file (columns: {', '.join(names)})")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise ConfigError(f"no {what} column found (looked for {', '.join(candidates)}; columns: "
                          f"{', '.join(names)}): name it with --{what}-column")
    return found


def table_inputs(path: str, rows_per_part: int, caption_column: str | None, key_column: str | None) -> Inputs:
    table = read_table(path)
    caption = _pick_column(table, caption_column, ("caption", "text", "TEXT", "title"), "caption", True)
    key = _pick_column(table, key_column, ("key", "id"), "key", False)
    parts = [Part(i, rows=(start, min(start + rows_per_part, table.num_rows)))
             for i, start in enumerate(range(0, table.num_rows, rows_per_part))]
    if not parts:
        raise ConfigError(f"caption file {path} has no rows")
    return Inputs(parts, str(Path(path).resolve()), table, caption, key)


def shard_inputs(spec: str, cache_dir: Path, quiet: bool) -> Inputs:
    """Shards as they are; an image folder, a .tar.gz of one, IDX or .npz arrays are written into shards in the
    cache once (the same conversion `polymodal eval` uses), and those shards are the parts."""
    from polymodal.data.shardlist import expand_shards
    from polymodal.eval.datasets import convert_raw, is_raw_source

    path = Path(spec)
    if path.exists() and is_raw_source(path):
        spec = str(convert_raw(spec, cache_dir, quiet=quiet))
    urls = expand_shards(spec)  # fails with a message naming the spec when nothing matches
    return Inputs([Part(i, url=u) for i, u in enumerate(urls)], spec)


def resolve_inputs(spec: str, *, cache_dir: Path, rows_per_part: int, caption_column: str | None = None,
                   key_column: str | None = None, quiet: bool = False) -> Inputs:
    if rows_per_part < 1:
        raise ConfigError(f"--rows-per-part must be at least 1, got {rows_per_part}")
    if is_table_file(spec):
        return table_inputs(spec, rows_per_part, caption_column, key_column)
    if not Path(spec).exists() and not any(c in spec for c in "{*?") and "::" not in spec:
        raise ConfigError(f"input {spec} does not exist")
    return shard_inputs(spec, cache_dir, quiet)
