"""How well a batch mixes its data: the share of distinct captions and the number of sources (shard folders).

A contrastive batch whose captions repeat (64 CIFAR-10 captions over 10 class names) has many false negatives per
row; shards that each hold one source, read through a small shuffle buffer, give exactly that. `polymodal data
stream` prints these figures, so a recipe's mixing can be checked before training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any


def source_of(url: str) -> str:
    """The folder a shard lies in (`data/cifar10-pairs/3.tar` -> `data/cifar10-pairs`): one source per folder."""
    return str(PurePosixPath(url).parent)


@dataclass
class BatchMix:
    """Means over the batches seen: distinct captions / batch size, distinct sources per batch, and the share of a
    batch that its largest source holds. Kept as sums; the means are derived."""
    batches: int = 0
    caption_batches: int = 0
    distinct_caption_sum: float = 0.0
    sources_sum: int = 0
    largest_source_sum: float = 0.0
    samples_per_source: Counter = field(default_factory=Counter)

    def add(self, batch: dict[str, Any]) -> None:
        urls = batch.get("__url__") or []
        captions = batch.get("caption")
        if isinstance(captions, list) and captions:
            self.caption_batches += 1
            self.distinct_caption_sum += len(set(captions)) / len(captions)
        counts = Counter(source_of(u) for u in urls)
        self.samples_per_source.update(counts)
        self.sources_sum += len(counts)
        if urls:
            self.largest_source_sum += max(counts.values()) / len(urls)
        self.batches += 1

    @property
    def sources(self) -> set[str]:
        return set(self.samples_per_source)

    @property
    def source_shares(self) -> dict[str, float]:
        """Each source's share of all samples seen (data.shard_weights sets these in resampled mode)."""
        total = sum(self.samples_per_source.values())
        return {source: n / total for source, n in self.samples_per_source.most_common()}

    @property
    def distinct_caption_share(self) -> float:
        return self.distinct_caption_sum / max(self.caption_batches, 1)

    @property
    def sources_per_batch(self) -> float:
        return self.sources_sum / max(self.batches, 1)

    @property
    def largest_source_share(self) -> float:
        return self.largest_source_sum / max(self.batches, 1)

    def summary(self) -> str:
        captions = (f"{100 * self.distinct_caption_share:.0f}% distinct captions per batch, "
                    if self.distinct_caption_share else "")
        return (f"{captions}{self.sources_per_batch:.1f} of {len(self.sources)} sources per batch, the largest "
                f"holding {100 * self.largest_source_share:.0f}% of it; samples by source: "
                + ", ".join(f"{source} {100 * share:.0f}%" for source, share in self.source_shares.items()))
