"""The output folder: clip-retrieval's file names, atomic part writes, and what marks a part as finished.

A part is finished when its metadata parquet exists: it is written last, by rename, after the .npy files and the
skipped list (each also written to a temporary name and renamed). A run killed at any point therefore leaves
only finished parts and temporary files; the rerun skips the former and rewrites the latter's part.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from polymodal.data.errors import ConfigError

INFO = "embed_info.json"
# The settings a resumed run must share with the run that wrote the folder (anything else may change).
SAME_ON_RESUME = ("model", "inputs", "what", "dtype", "normalize", "image_size", "rows_per_part", "parts", "seed",
                  "caption_column", "key_column")


def emb_path(out: Path, kind: str, part: int) -> Path:
    """kind: "img" or "text"."""
    return out / f"{kind}_emb" / f"{kind}_emb_{part}.npy"


def metadata_path(out: Path, part: int) -> Path:
    return out / "metadata" / f"metadata_{part}.parquet"


def skipped_path(out: Path, part: int) -> Path:
    return out / "skipped" / f"skipped_{part}.jsonl"


def finished_parts(out: Path) -> set[int]:
    folder = out / "metadata"
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"metadata_(\d+)\.parquet", p.name))}


def part_numbers(out: Path, kind: str) -> list[int]:
    """Finished parts holding `kind` embeddings, in part order (numeric, not lexicographic)."""
    return sorted(p for p in finished_parts(out) if emb_path(out, kind, p).is_file())


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(final)


def write_part(out: Path, part: int, embeddings: dict[str, np.ndarray], metadata: list[dict[str, Any]],
               skipped: list[dict[str, Any]]) -> None:
    """Write one part; the metadata file goes last (see the module docstring)."""
    import pyarrow.parquet as pq

    for kind, array in embeddings.items():
        final = emb_path(out, kind, part)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
        _replace(tmp, final)
    final = skipped_path(out, part)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped))
    _replace(tmp, final)
    final = metadata_path(out, part)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(_metadata_table(metadata), tmp)
    _replace(tmp, final)


def _metadata_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    if not rows:
        return pa.table({"key": pa.array([], pa.string())})
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # A field whose type varies between rows (a .json value that is 3 here and "3" there): store all as text.
        return pa.Table.from_pylist([{k: v if v is None or k == "key" else str(v) for k, v in r.items()}
                                     for r in rows])


def check_info(out: Path, info: dict[str, Any]) -> bool:
    """Whether `out` already holds a run; raises ConfigError when that run's settings differ from `info`."""
    path = out / INFO
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    changed = [k for k in SAME_ON_RESUME if old.get(k) != info.get(k)]
    if changed:
        raise ConfigError(f"{out} holds embeddings made with other settings ({', '.join(changed)}: "
                          f"{old.get(changed[0])!r} there, {info.get(changed[0])!r} now); pass the same settings "
                          "to resume, or --overwrite, or another --output")
    return True


def start_output(out: Path, info: dict[str, Any], overwrite: bool) -> None:
    """Record the run's settings; with `overwrite`, first remove the parts of an earlier run."""
    if overwrite:
        import shutil

        for sub in ("img_emb", "text_emb", "metadata", "skipped"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for index in out.glob("*.index*"):
            index.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
