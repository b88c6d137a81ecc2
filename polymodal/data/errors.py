"""Why a sample or shard was skipped, and counters of those reasons.

Bad input never stops a run: every reader and writer raises `SampleSkipped` for a bad sample, the caller
counts it under its reason and moves on. Only configuration mistakes raise `ConfigError`.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("polymodal.data")

# Every reason a sample, member or shard can be skipped. Kept in one place so logs, stats.json and tests use
# the same names.
REASONS = {
    "missing_shard": "a shard file listed in the spec does not exist or cannot be opened",
    "empty_shard": "a shard holds no samples (zero bytes or an empty tar)",
    "truncated_shard": "a shard ends before its end-of-archive marker (a sample cut inside a member is dropped)",
    "corrupt_shard": "a shard is not a readable tar at all",
    "forbidden_member": "a member whose extension could hold pickled code (.pth, .pyd, .pickle, .pkl)",
    "duplicate_key": "a key seen before in the same shard, or a repeated member inside one sample",
    "empty_member": "a zero-byte member that a requested modality needs",
    "missing_modality": "the sample lacks a modality the pipeline requires",
    "corrupt_image": "image bytes that do not decode",
    "image_too_large": "an image above the pixel limit (decompression bomb guard)",
    "bad_text": "text bytes that are not valid UTF-8",
    "bad_label": "a label that is not an integer",
    "bad_array": "array bytes that do not load as a plain (unpickled) .npy",
    "bad_tokens": "token ids of the wrong dtype or grid, or outside their set's vocabulary",
    "transform_failed": "a transform or tokenizer raised on the sample",
    "unreadable_source": "a source file (importers) that cannot be read",
}


class ConfigError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line and exits 2."""


class SampleSkipped(Exception):
    """Raised for one bad sample; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Crosses process boundaries (writer pool, loader workers) with its two fields intact.
        return SampleSkipped, (self.reason, self.detail)


def skip_reason(exc: BaseException) -> SampleSkipped:
    """A counted skip for any exception raised on one sample (a transform or tokenizer bug included)."""
    if isinstance(exc, SampleSkipped):
        return exc
    return SampleSkipped("transform_failed", f"{type(exc).__name__}: {exc}")


class SkipCounter:
    """Counts skips by reason and logs the first occurrence of each reason with its detail.

    Later occurrences are only counted so a shard full of bad samples does not flood the log.
    """

    def __init__(self, where: str = ""):
        self.counts: Counter[str] = Counter()
        self.where = where

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        first = self.counts[reason] == 0
        self.counts[reason] += n
        if first:
            prefix = f"[{self.where}] " if self.where else ""
            log.warning("%sskipped (%s): %s; later ones are only counted", prefix, reason, detail or REASONS[reason])

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load(self, counts: dict[str, int]) -> None:
        self.counts = Counter(counts)


def summarize(counts: dict[str, int]) -> str:
    """One line for logs: 'skipped 3 (corrupt_image=2, bad_text=1)' or 'skipped 0'."""
    total = sum(counts.values())
    if not total:
        return "skipped 0"
    inner = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    return f"skipped {total} ({inner})"
