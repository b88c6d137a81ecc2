"""One loader worker's sample stream: its shards in order, a shuffle buffer, and an exact saved position.

Every random choice is a pure function of the position in the stream (seed, epoch, worker, shard position,
sample index, pick number), so the stream's whole state is a few integers plus the list of buffered sample
positions. Restoring re-reads the shards those positions point into (bytes only, no decoding) and continues
with exactly the samples that would have come next.
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

from polymodal.data.errors import ConfigError, SkipCounter, summarize
from polymodal.data.join import iter_joined
from polymodal.data.tar_samples import RawSample

_WORD = 1 << 32

# Resampled mode never ends by itself: when this many shard draws in a row (per shard listed, up to a cap) gave
# no usable sample, the data cannot feed training (a required modality no shard holds, every shard empty or
# gone) and the stream stops with the skip counts instead of spinning forever. Generous, so a dataset where
# only a few shards are usable still runs: with one good shard in N, 20 N draws all miss it with odds ~e^-20.
IDLE_DRAWS_PER_SHARD, MAX_IDLE_DRAWS = 20, 1000


def seeded(*parts: int) -> random.Random:
    """An RNG determined by a tuple of small integers (each below 2**32)."""
    value = 0
    for part in parts:
        value = value * _WORD + (part % _WORD)
    return random.Random(value)


# Salts keep the different uses of (seed, ...) apart.
_SHARD_ORDER, _SHARD_DRAW, _PICK, _AUGMENT = 1, 2, 3, 4


def epoch_shards(urls: list[str], seed: int, epoch: int, shuffle: bool, worker: int, total: int) -> list[str]:
    """Epoch mode: the whole list is shuffled the same way on every rank, then dealt round-robin."""
    order = list(urls)
    if shuffle:
        seeded(_SHARD_ORDER, seed, epoch).shuffle(order)
    return order[worker::total]


def augment_rng(seed: int, epoch: int, worker: int, pos: int, index: int, repeat: int = 0) -> random.Random:
    if repeat:
        return seeded(_AUGMENT, seed, epoch, worker, pos, index, repeat)
    return seeded(_AUGMENT, seed, epoch, worker, pos, index)


class WorkerStream:
    """Raw samples for one (rank, worker) in one epoch, with `state()` valid between any two samples.

    resampled=False: the worker's share of the epoch's shards, once each. resampled=True: an endless series of
    shards drawn with replacement. Positions: `cursor` is the index of the shard being read in that series,
    `read` the number of sample slots of it consumed, `buffer` the (shard position, sample index) pairs held.
    The consumer reports whether each sample it took was usable (`judge`); resampled mode raises ConfigError
    after too many draws without one.
    """

    def __init__(self, urls: list[str], *, seed: int, epoch: int, worker: int, total_workers: int,
                 resampled: bool, shuffle_shards: bool, buffer_size: int, buffer_initial: int,
                 counter: SkipCounter, allow_pipe: bool = False, weights: list[float] | None = None,
                 joins: list[str] | None = None, repeats: int = 1):
        self.urls = urls
        self.joins = list(joins or [])  # folders of shard sets joined by key (polymodal.data.join)
        # `repeated()` hands out each sample `repeats` times; `repeating` is the sample still owed repeats.
        self.repeats = max(1, repeats)
        self.repeating: tuple[int, int, RawSample] | None = None
        self.next_repeat = 0
        # Resampled draws: uniform over `urls`, or by these relative weights (one per url).
        self.cum_weights = list(itertools.accumulate(weights)) if weights else None
        self.seed, self.epoch, self.worker = seed, epoch, worker
        self.resampled = resampled
        self.mine = None if resampled else epoch_shards(urls, seed, epoch, shuffle_shards, worker, total_workers)
        self.buffer_size = max(0, buffer_size)
        self.buffer_initial = max(1, min(buffer_initial, self.buffer_size or 1))
        self.counter = counter
        self.allow_pipe = allow_pipe
        self.cursor = 0
        self.read = 0
        self.picks = 0
        self.buffer: list[tuple[int, int, RawSample]] = []
        self.idle_limit = min(IDLE_DRAWS_PER_SHARD * len(urls), MAX_IDLE_DRAWS) if resampled else None
        # Draws found without a usable sample since the last usable one; a sample still in the buffer is not
        # judged yet, so filling the buffer never counts.
        self.idle_draws: set[int] = set()

    def shard_at(self, pos: int) -> str | None:
        if self.resampled:
            rng = seeded(_SHARD_DRAW, self.seed, self.worker, pos)
            if self.cum_weights:
                return rng.choices(self.urls, cum_weights=self.cum_weights)[0]
            return self.urls[rng.randrange(len(self.urls))]
        return self.mine[pos] if pos < len(self.mine) else None

    # -- position -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        state = {"cursor": self.cursor, "read": self.read, "picks": self.picks,
                 "buffer": [[pos, idx] for pos, idx, _ in self.buffer]}
        if self.repeating is not None:
            state["repeat"] = [self.repeating[0], self.repeating[1], self.next_repeat]
        return state

    def restore(self, state: dict) -> None:
        """Re-read what the saved buffer held and move to the saved cursor (no decoding, no double counting)."""
        self.cursor, self.read, self.picks = state["cursor"], state["read"], state["picks"]
        wanted: dict[int, set[int]] = {}
        owed = state.get("repeat")
        for pos, idx in state["buffer"] + ([owed[:2]] if owed else []):
            wanted.setdefault(pos, set()).add(idx)
        found: dict[tuple[int, int], RawSample] = {}
        for pos, indices in sorted(wanted.items()):
            last = max(indices)
            for idx, raw in iter_joined(self.shard_at(pos), self.joins, None, self.allow_pipe):
                if idx in indices:
                    found[(pos, idx)] = raw
                if idx >= last:
                    break
        # A sample that cannot be found again (the shard changed on disk) is dropped rather than invented.
        self.buffer = [(pos, idx, found[(pos, idx)]) for pos, idx in state["buffer"] if (pos, idx) in found]
        if owed and (owed[0], owed[1]) in found:
            self.repeating, self.next_repeat = (owed[0], owed[1], found[(owed[0], owed[1])]), owed[2]

    # -- usable data ----------------------------------------------------------------------------------------

    def judge(self, pos: int, usable: bool) -> None:
        """The consumer's verdict on a sample taken from draw `pos`. Raises ConfigError past the idle limit."""
        if usable:
            self.idle_draws.clear()
            return
        self.idle_draws.add(pos)
        if self.idle_limit is not None and len(self.idle_draws) >= self.idle_limit:
            where = f"[{self.counter.where}] " if self.counter.where else ""
            raise ConfigError(
                f"{where}no usable sample in {len(self.idle_draws)} shard draws (data.resampled=true draws "
                f"forever, so it stops here): {summarize(self.counter.as_dict())}. Check data.modalities and "
                "data.shards against what the shards hold: polymodal data inspect SHARDS")

    # -- iteration ------------------------------------------------------------------------------------------

    def _pick(self) -> tuple[int, int, RawSample]:
        j = seeded(_PICK, self.seed, self.epoch, self.worker, self.picks).randrange(len(self.buffer))
        self.picks += 1
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def _threshold(self) -> int:
        """Buffer fill at which one sample is handed out: starts small, grows to buffer_size (fast first batch)."""
        return min(self.buffer_size, self.buffer_initial + self.picks)

    def repeated(self) -> Iterator[tuple[int, int, RawSample, int]]:
        """(pos, idx, sample, repeat number): each sample `repeats` times in a row (ml-4m's cheap throughput trick:
        one read and decode of the bytes, fresh augmentation and masking each time). `state()` between any two
        covers the repeat owed; `drop_repeats()` skips the rest of a sample that turned out unusable."""
        if self.repeating is not None:  # restored in the middle of a sample's repeats
            yield from self._repeat(*self.repeating, self.next_repeat)
        for pos, idx, raw in self:
            yield from self._repeat(pos, idx, raw, 0)

    def _repeat(self, pos: int, idx: int, raw: RawSample, first: int) -> Iterator[tuple[int, int, RawSample, int]]:
        self.repeating, self.next_repeat = (pos, idx, raw), first
        while self.repeating is not None and self.next_repeat < self.repeats:
            repeat = self.next_repeat
            self.next_repeat += 1
            if self.next_repeat == self.repeats:
                self.repeating = None
            yield pos, idx, raw, repeat
        self.repeating = None

    def drop_repeats(self) -> None:
        self.repeating = None

    def __iter__(self) -> Iterator[tuple[int, int, RawSample]]:
        while True:
            url = self.shard_at(self.cursor)
            if url is None:
                break
            skip = self.read
            found = False
            for idx, raw in iter_joined(url, self.joins, self.counter, self.allow_pipe, count_from=skip):
                if idx < skip:
                    continue
                self.read = idx + 1
                found = True
                if self.buffer_size == 0:
                    yield self.cursor, idx, raw
                    continue
                self.buffer.append((self.cursor, idx, raw))
                if len(self.buffer) >= self._threshold():
                    yield self._pick()
            if not found:
                self.judge(self.cursor, usable=False)
            self.cursor += 1
            self.read = 0
        while self.buffer:
            yield self._pick()
