"""Selecting some tokens of a batch for a transformer, packed (variable-length sequences, no padding) or padded
(to the longest sample, with a key-padding mask): the encoders of MultiMAE and 4M see only their inputs, 4M's
decoder only its targets."""

from __future__ import annotations

import torch

from polymodal.models.attention import Packing


class Visible:
    """The visible tokens of a batch, `keep` bool [B, N]: selects them from full-length tokens [B, N, C] and puts
    them back. Packed: [T, C] with a Packing. Padded: [B, L, C] (L = the most any sample keeps) with `pad_mask`
    [B, L] True at real tokens."""

    def __init__(self, keep: torch.Tensor, packed: bool):
        self.keep, self.packed = keep, packed
        lengths = keep.sum(1)
        if packed:
            self.packing, self.pad_mask = Packing.from_lengths(lengths), None
        else:
            self.packing = None
            longest = int(lengths.max())
            # The kept positions first, in their order.
            self.index = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :longest]
            self.pad_mask = torch.arange(longest, device=keep.device) < lengths[:, None]

    def select(self, full: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return full[self.keep]
        return full.gather(1, self.index[..., None].expand(-1, -1, full.shape[-1]))

    def scatter(self, selected: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """`fill` [B, N, C] with the selected tokens written back at their positions."""
        if self.packed:
            out = fill.clone()
            out[self.keep] = selected.to(out.dtype)
            return out
        index = self.index[..., None].expand(-1, -1, fill.shape[-1])
        selected = torch.where(self.pad_mask[..., None], selected.to(fill.dtype), fill.gather(1, index))
        return fill.scatter(1, index, selected)

    def attention_kwargs(self) -> dict:
        return {"packing": self.packing} if self.packed else {"mask": self.pad_mask}
