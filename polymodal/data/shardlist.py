"""Turning a shard spec into a list of shard URLs, and opening one shard.

A spec is a brace pattern (`data/{0..99}.tar`), a glob (`data/*.tar`), a folder (every .tar inside), an
fsspec URL (`s3://bucket/train-{000..999}.tar`), several of these joined by `::`, or a list of them.
`pipe:` URLs run a shell command, so they are refused unless the user turns them on (`allow_pipe`).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import IO, Iterable

import braceexpand
import fsspec

from polymodal.data.errors import ConfigError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def natural_key(text: str) -> list:
    """Sort '2.tar' before '10.tar'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _list_folder(path: str) -> list[str]:
    if _is_url(path):
        fs, root = fsspec.core.url_to_fs(path)
        found = [f for f in fs.ls(root, detail=False) if f.endswith(SHARD_SUFFIXES)]
        protocol = path.split("://", 1)[0]
        return sorted((f"{protocol}://{f}" for f in found), key=natural_key)
    return sorted((os.path.join(path, f) for f in os.listdir(path) if f.endswith(SHARD_SUFFIXES)),
                  key=natural_key)


def _expand_one(spec: str, allow_pipe: bool) -> list[str]:
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(f"refusing shard URL {spec[:60]!r}: 'pipe:' runs a shell command; "
                              "set data.allow_pipe=true if you trust this spec")
        return list(braceexpand.braceexpand(spec))
    out: list[str] = []
    for path in braceexpand.braceexpand(spec):
        if _is_url(path):
            if any(ch in path for ch in "*?["):
                fs, _ = fsspec.core.url_to_fs(path)
                protocol = path.split("://", 1)[0]
                out.extend(sorted((f"{protocol}://{p}" for p in fs.glob(path)), key=natural_key))
            else:
                out.append(path)
            continue
        local = _local(path)
        if os.path.isdir(local):
            out.extend(_list_folder(local))
        elif any(ch in local for ch in "*?["):
            out.extend(sorted(glob.glob(local), key=natural_key))
        else:
            out.append(local)
    return out


def expand_entries(spec: str | Iterable[str], allow_pipe: bool = False) -> list[list[str]]:
    """The shard URLs of each entry of a spec (a list's items; a string is one entry), in order. Raises
    ConfigError when nothing matches.

    Local files that are listed but missing stay in the list (they are skipped and counted when read), unless
    none of the listed files exists, which is a configuration error.
    """
    entries = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    per_entry = [[url for part in entry.split("::") for url in _expand_one(part, allow_pipe)] for entry in entries]
    urls = [url for entry in per_entry for url in entry]
    if not urls:
        raise ConfigError(f"no shards match {spec!r} (expected .tar files, a folder of them, or a brace pattern)")
    if len(missing_local(urls)) == len(urls):
        raise ConfigError(f"none of the {len(urls)} shards of {spec!r} exists (first: {urls[0]})")
    return per_entry


def expand_shards(spec: str | Iterable[str], allow_pipe: bool = False) -> list[str]:
    """All shard URLs of a spec, in order (see expand_entries)."""
    return [url for entry in expand_entries(spec, allow_pipe) for url in entry]


def weights_per_shard(entries: list[list[str]], weights: list[float]) -> list[float]:
    """The draw weight of each shard of `expand_entries`' result: entry i's weight for each of entry i's shards.
    Raises ConfigError unless there is one non-negative weight per entry, not all zero."""
    if len(weights) != len(entries):
        raise ConfigError(f"data.shard_weights has {len(weights)} weights for {len(entries)} entries of data.shards "
                          "(one weight per entry; list the shards as a list to weight them apart)")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"data.shard_weights must be non-negative and not all zero, got {list(weights)}")
    return [float(weight) for entry, weight in zip(entries, weights) for _ in entry]


def missing_local(urls: list[str]) -> list[str]:
    return [u for u in urls if not _is_url(u) and not u.startswith("pipe:") and not os.path.exists(u)]


class _PipeStream:
    """stdout of a `pipe:` command; closing it waits for the command."""

    def __init__(self, command: str):
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.stream = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def close(self) -> None:
        self.stream.close()
        self.proc.wait()


def open_shard(url: str, allow_pipe: bool = False) -> IO[bytes]:
    """A readable binary stream for one shard. Raises OSError when it cannot be opened."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError("refusing a 'pipe:' shard URL; set data.allow_pipe=true to run shell commands")
        return _PipeStream(url[len("pipe:"):])
    if _is_url(url):
        return fsspec.open(url, "rb").open()
    return open(_local(url), "rb", buffering=1 << 20)
