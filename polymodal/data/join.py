"""Joining shard sets by key: a sample's members come from the source shard and from the shard of the same name
in each joined set (`data.join`), as ml-4m joins one shard set per modality.

A joined set is written in its source's order (`polymodal data derive` and `tokenize` keep it), with samples the
job could not process left out, so a key is looked for by reading that set's shard forward; keys passed on the way
are held until asked for. A key a set lacks leaves the sample without that modality: the decoder counts
`missing_modality` when it is required, and marks it absent when it is optional.
"""

from __future__ import annotations

from typing import Iterator

from polymodal.data.errors import SkipCounter
from polymodal.data.tar_samples import RawSample, iter_shard


def joined_url(folder: str, url: str) -> str:
    """The shard of the set in `folder` that mirrors source shard `url` (same file name)."""
    return f"{folder.rstrip('/')}/{url.rstrip('/').rsplit('/', 1)[-1]}"


class _JoinedShard:
    def __init__(self, url: str, counter: SkipCounter | None, allow_pipe: bool):
        self.samples = iter_shard(url, counter, allow_pipe)
        self.held: dict[str, RawSample] = {}

    def take(self, key: str) -> RawSample | None:
        if key in self.held:
            return self.held.pop(key)
        for _, raw in self.samples:
            if raw["__key__"] == key:
                return raw
            self.held[raw["__key__"]] = raw
        return None


def iter_joined(url: str, joins: list[str], counter: SkipCounter | None, allow_pipe: bool = False,
                count_from: int = 0) -> Iterator[tuple[int, RawSample]]:
    """`iter_shard(url, ...)` with the members of each joined set's shard added by key (the source's members
    win where an extension repeats). Problems of a joined shard are counted on the first read of it only."""
    if not joins:
        yield from iter_shard(url, counter, allow_pipe, count_from)
        return
    side_counter = counter if count_from == 0 else None
    sides = [_JoinedShard(joined_url(folder, url), side_counter, allow_pipe) for folder in joins]
    for index, raw in iter_shard(url, counter, allow_pipe, count_from):
        for side in sides:
            extra = side.take(raw["__key__"])
            if extra is not None:
                for ext, data in extra.items():
                    raw.setdefault(ext, data)
        yield index, raw
