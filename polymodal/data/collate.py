"""Batching samples (dicts keyed by modality) into one dict of batched values.

Equal-shape tensors are stacked; 1-D tensors of different lengths (token ids) are right-padded with
`pad_value` and get a `<name>_lengths` entry; numbers become tensors; strings and anything else become lists.
Written by hand because torch's default_collate refuses ragged sequences and would pad nothing.
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


def collate(samples: list[dict[str, Any]], pad_value: int = 0) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        first = values[0]
        if isinstance(first, np.ndarray):
            values = [torch.from_numpy(np.ascontiguousarray(v)) for v in values]
            first = values[0]
        if isinstance(first, torch.Tensor):
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
