"""Batching samples (dicts keyed by modality) into one dict of batched values.

Equal-shape tensors are stacked; 1-D tensors of different lengths (token ids) are right-padded with
`pad_value` and get a `<name>_lengths` entry; numbers become tensors; strings and anything else become lists.
A batch may mix samples with and without an optional modality: that modality gets a bool `<name>_present` [B]
entry, and the absent rows are zeros (tensors, numbers; sequences of length 0) or None (lists).
Written by hand because torch's default_collate refuses ragged sequences, would pad nothing, and takes the keys of
the first sample only.
"""

from __future__ import annotations

from numbers import Number
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info


def pad_sequences(seqs: list[torch.Tensor], pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_value, dtype=seqs[0].dtype)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = seq
    return out, lengths


def stack(values: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a loader worker, straight into shared memory (as torch's default_collate does),
    which saves copying every batch once more when it is sent to the main process."""
    if get_worker_info() is None:
        return torch.stack(values)
    first = values[0]
    storage = first.untyped_storage()._new_shared(len(values) * first.numel() * first.element_size())
    out = torch.empty(0, dtype=first.dtype).set_(storage).view(len(values), *first.shape)
    return torch.stack(values, out=out)


def absent_value(values: list[Any]) -> Any:
    """What an absent sample holds in place of a modality the others have: zeros shaped like theirs, an empty
    sequence where theirs differ in length, 0 for numbers, None for anything else."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(v.shape == first.shape for v in values):
            return torch.zeros_like(first)
        return first.new_zeros((0,)) if all(v.dim() == 1 for v in values) else None
    if isinstance(first, Number) and not isinstance(first, bool):
        return type(first)(0)
    return None


def collate(samples: list[dict[str, Any]], pad_value: int = 0) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for name in dict.fromkeys(name for s in samples for name in s):
        present = [name in s for s in samples]
        values = [s[name] for s in samples if name in s]
        if isinstance(values[0], np.ndarray):
            values = [torch.from_numpy(np.ascontiguousarray(v)) for v in values]
        if not all(present):
            batch[f"{name}_present"] = torch.tensor(present)
            fill, found = absent_value(values), iter(values)
            values = [next(found) if here else fill for here in present]
        first = values[0] if all(present) else next(v for v, here in zip(values, present) if here)
        if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
            if all(v.shape == first.shape for v in values):
                batch[name] = stack(values)
            elif all(v.dim() == 1 for v in values):
                batch[name], batch[f"{name}_lengths"] = pad_sequences(values, pad_value)
            else:
                batch[name] = values
        elif isinstance(first, bool) or not isinstance(first, Number):
            batch[name] = values
        else:
            batch[name] = torch.tensor(values)
    return batch
