"""T5-style span masking of token sequences (captions, palettes, metadata) for 4M, on the device and vectorised
over the batch: no per-sample Python loop, nothing in loader workers.

For one sequence (4M's `simple_span_masking`): each token is kept with probability p; every run of masked tokens
becomes one sentinel in the input, and the target lists each run after its sentinel, then one closing sentinel:

    tokens  a b c d e [EOS]        kept: a, d, e
    input   a [S_0] d e [S_1]      target  [S_0] b c [S_1] [EOS] [S_2]

As 4M: p is drawn per sample (`keep`: random = U(0, 1), all = 1, binary = 0 or 1) and lowered by x0.9 until the
input fits the sample's input budget (an input budget of 0 gives no input: the whole sequence is the target);
a target over its budget is cut to a window that starts at a sentinel (a random one, or the earliest one whose
remainder fits, whichever is earlier, as 4M picks it) and, here, also ends at a sentinel, so a truncated target
still says where its spans stop (4M cuts mid-span; we do so only when one span alone exceeds the budget).

One difference, on purpose: 4M redraws the keep mask each time it lowers p; here the same uniform noise is
compared with each lowered p, so all the lowerings are tried at once (as tensors) and the first that fits is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEEP_SCHEMES = ("random", "all", "binary")
DECAY = 0.9  # 4M's keep_prob_decay_factor
TRIES = 64  # p * 0.9**63 < 0.0013: then p = 0 (one sentinel), which always fits a budget of 1 or more


@dataclass
class Spans:
    """Padded sequences with their lengths: ids [B, L] (`pad_id` after each length), lengths int64 [B]."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def valid(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1], device=self.ids.device) < self.lengths[:, None]


def keep_probability(batch_size: int, scheme: str, device) -> torch.Tensor:
    if scheme == "random":
        return torch.rand(batch_size, device=device)
    if scheme == "all":
        return torch.ones(batch_size, device=device)
    if scheme == "binary":
        return (torch.rand(batch_size, device=device) < 0.5).float()
    raise ValueError(f"keep scheme must be one of {', '.join(KEEP_SCHEMES)}, got {scheme!r}")


def span_mask(ids: torch.Tensor, lengths: torch.Tensor, input_budget: torch.Tensor, target_budget: torch.Tensor,
              sentinels: torch.Tensor, keep: torch.Tensor, pad_id: int = 0) -> tuple[Spans, Spans]:
    """(inputs, targets) of `ids` [B, L] (each row's first `lengths` tokens) under per-sample budgets (int [B])
    and keep probabilities `keep` (float [B], see `keep_probability`). `sentinels` int64 [S] are the sentinel ids
    in order; a row needs at most ceil(L / 2) + 1 of them (checked)."""
    b, length = ids.shape
    device = ids.device
    valid = torch.arange(length, device=device) < lengths[:, None]
    if length and (length + 1) // 2 + 1 > len(sentinels):
        raise ValueError(f"sequences of {length} tokens need up to {(length + 1) // 2 + 1} sentinels; the vocabulary "
                         f"gives {len(sentinels)}")
    kept = _kept_within_budget(torch.rand(b, length, device=device), valid, keep, input_budget)
    masked = valid & ~kept
    starts = masked & ~_previous(masked)
    span = starts.long().cumsum(1) - 1  # the span index of each masked token
    sentinel_at = sentinels[span.clamp_min(0)]

    # Input: kept tokens in place, one sentinel where each span starts.
    emit = kept | starts
    inputs = _compact(torch.where(kept, ids, sentinel_at), emit, pad_id)
    no_input = input_budget <= 0
    inputs.lengths = torch.where(no_input, 0, inputs.lengths)
    inputs.ids = inputs.ids.masked_fill(no_input[:, None], pad_id)

    # Target: each span's sentinel then its tokens, then a closing sentinel. Each masked token emits itself, and
    # a span's first token emits its sentinel just before it.
    count = starts.long() + masked.long()
    end = count.cumsum(1) - 1  # where each masked token lands
    total = count.sum(1)
    width = int(total.max()) + 1 if b else 1
    targets = torch.full((b, width), pad_id, dtype=ids.dtype, device=device)
    rows = torch.arange(b, device=device)[:, None].expand(b, length)
    targets[rows[masked], end[masked]] = ids[masked]
    targets[rows[starts], end[starts] - 1] = sentinel_at[starts]
    targets[torch.arange(b, device=device), total] = sentinels[starts.sum(1)]
    return inputs, _cut(Spans(targets, total + 1), sentinels, target_budget, pad_id)


def _previous(mask: torch.Tensor) -> torch.Tensor:
    """`mask` shifted right by one along the last dim (False enters): whether the previous token is masked."""
    return torch.nn.functional.pad(mask[..., :-1], (1, 0), value=False)


def _kept_within_budget(noise, valid, keep, input_budget) -> torch.Tensor:
    """Keep token i while noise_i < p, with p the first of keep * 0.9**j (j = 0, 1, ...) whose input (kept tokens
    plus one sentinel per masked run) fits the input budget; p = 0 if none does."""
    b, length = noise.shape
    p = keep[:, None] * DECAY ** torch.arange(TRIES, device=noise.device)  # [B, J]
    p = torch.cat([p, torch.zeros(b, 1, device=noise.device)], 1)
    kept = (noise[:, None, :] < p[:, :, None]) & valid[:, None, :]  # [B, J + 1, L]
    masked = valid[:, None, :] & ~kept
    size = kept.sum(-1) + (masked & ~_previous(masked)).sum(-1)  # [B, J + 1]
    fits = size <= input_budget[:, None]
    fits[:, -1] = True
    first = fits.float().argmax(1)  # the first lowering that fits
    return kept[torch.arange(b, device=noise.device), first]


def _compact(values: torch.Tensor, emit: torch.Tensor, pad_id: int) -> Spans:
    """The `emit`ted entries of each row, moved to the front in order."""
    b = values.shape[0]
    lengths = emit.sum(1)
    out = torch.full((b, int(lengths.max()) if b and values.shape[1] else 0), pad_id, dtype=values.dtype,
                     device=values.device)
    position = emit.long().cumsum(1) - 1
    rows = torch.arange(b, device=values.device)[:, None].expand_as(emit)
    out[rows[emit], position[emit]] = values[emit]
    return Spans(out, lengths)


def _cut(targets: Spans, sentinels: torch.Tensor, budget: torch.Tensor, pad_id: int) -> Spans:
    """Each target longer than its budget, cut to a window that starts and (where it can) ends at a sentinel."""
    ids, total = targets.ids, targets.lengths
    b, width = ids.shape
    device = ids.device
    position = torch.arange(width, device=device).expand(b, width)
    is_sentinel = torch.isin(ids, sentinels) & targets.valid()
    count = is_sentinel.sum(1)
    # A random sentinel, not the closing one (when there is more than one).
    pick = (torch.rand(b, device=device) * (count - 1).clamp_min(1)).long()
    rank = is_sentinel.long().cumsum(1) - 1
    chosen = (is_sentinel & (rank == pick[:, None])).float().argmax(1)
    # The earliest sentinel whose remainder fits the budget (the closing one always does, for a budget >= 1).
    fitting = is_sentinel & (total[:, None] - position <= budget[:, None])
    earliest = torch.where(fitting.any(1), fitting.float().argmax(1), chosen)
    start = torch.minimum(chosen, earliest)
    # End at the last sentinel within the budget after the start; else (one span longer than the budget) mid-span.
    inside = is_sentinel & (position > start[:, None]) & (position - start[:, None] < budget[:, None])
    last = width - 1 - inside.flip(1).float().argmax(1)
    end = torch.where(inside.any(1), last, start + budget - 1)
    over = total > budget
    start = torch.where(over, start, 0)
    length = torch.where(over, end - start + 1, total).clamp_min(0)
    length = torch.where(budget <= 0, 0, length)
    index = (start[:, None] + position).clamp_max(width - 1)
    window = ids.gather(1, index)
    keep = position < length[:, None]
    out_width = int(length.max()) if b else 0
    return Spans(window.masked_fill(~keep, pad_id)[:, :out_width], length)


__all__ = ["KEEP_SCHEMES", "Spans", "keep_probability", "span_mask"]
