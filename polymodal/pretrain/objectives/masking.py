"""Masking for the masked multimodal objectives (MultiMAE, 4M): which tokens of each sample the encoder sees.

Everything here runs on the batch's device, vectorised over the batch (one argsort per call, no per-sample Python
loop), and draws from torch's global generator, which the engine seeds and checkpoints per rank: a resumed run
draws the same masks as one that never stopped. Nothing runs in loader workers.

Tokens of all modalities sit side by side, `[B, N]` with N = the sum of each modality's token count, in the order
of `segments` (one modality's tokens, then the next's). Masks are bool, True where the encoder sees the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def draw_budget(batch_size: int, num_visible: int | Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Visible tokens per sample, int64 [B]: `num_visible` for all, or uniform on [lo, hi] (both included) when it
    is a pair (nano4M draws U(1, 128); a spread of counts is what the packed attention path is for)."""
    if isinstance(num_visible, int):
        return torch.full((batch_size,), num_visible, dtype=torch.long, device=device)
    lo, hi = num_visible
    return torch.randint(lo, hi + 1, (batch_size,), device=device)


def dirichlet_shares(present: torch.Tensor, alpha: float | Sequence[float],
                     sample_modalities_uniformly: bool = False) -> torch.Tensor:
    """Each sample's split of its visible budget across modalities, float [B, M], rows summing to 1 over the
    modalities it has (`present`, bool [B, M]); absent modalities get 0.

    A Dirichlet(alpha) draw per sample, renormalised over the present modalities (the Dirichlet restricted to a
    subset of its coordinates is again a Dirichlet with those alphas). With `sample_modalities_uniformly`
    (MultiMAE's option), a uniformly drawn non-empty subset of the present modalities shares the budget first."""
    b, m = present.shape
    concentration = torch.as_tensor(alpha, dtype=torch.float32, device=present.device).expand(m)
    # Gamma draws normalised = Dirichlet; torch samples them on the device.
    gammas = torch.distributions.Gamma(concentration, torch.ones_like(concentration)).sample((b,))
    keep = present.clone()
    if sample_modalities_uniformly:
        # Rejection sampling of Bernoulli(0.5) subsets until non-empty: uniform over non-empty subsets.
        pick = torch.rand(b, m, device=present.device) < 0.5
        pick &= present
        empty = ~pick.any(1) & present.any(1)
        while empty.any():
            redraw = (torch.rand(b, m, device=present.device) < 0.5) & present
            pick = torch.where(empty[:, None], redraw, pick)
            empty = ~pick.any(1) & present.any(1)
        keep = pick
    weights = gammas * keep
    # A row where every present Gamma underflowed to 0 (tiny alphas) gets an even split instead of 0/0.
    total = weights.sum(1, keepdim=True)
    even = keep.float() / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, weights / total.clamp_min(1e-30), even)


def segment_ids(segments: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The modality index of each of the N tokens, int64 [N]."""
    return torch.repeat_interleave(torch.arange(len(segments), device=device),
                                   torch.as_tensor(list(segments), device=device))


def draw_visible(present: torch.Tensor, segments: Sequence[int], budget: torch.Tensor,
                 alpha: float | Sequence[float] = 1.0, sample_modalities_uniformly: bool = False) -> torch.Tensor:
    """The tokens each sample's encoder sees, bool [B, N].

    - `present` bool [B, M]: which modalities each sample has (absent ones give no token);
    - `segments`: the token count of each modality (their tokens sit side by side in that order);
    - `budget` int [B]: visible tokens per sample. A sample gets exactly min(budget, tokens of its present
      modalities).

    As MultiMAE: modality i gets round(share_i * budget) tokens, drawn uniformly within it; rounding is then fixed
    so the total is exact, by one argsort over all tokens that ranks the chosen tokens first (in random order), then
    the other present tokens (in random order), then absent ones."""
    b, m = present.shape
    if len(segments) != m:
        raise ValueError(f"{m} modalities are marked present or absent, but {len(segments)} segments are given")
    device = present.device
    seg = segment_ids(segments, device)  # [N]
    n = seg.numel()
    counts = (dirichlet_shares(present, alpha, sample_modalities_uniformly) * budget[:, None]).round()  # [B, M]
    # Each token's rank within its modality: sort by (modality, noise), then subtract the modality's start.
    noise = torch.rand(b, n, device=device)
    order = (seg.to(noise.dtype) + noise).argsort(1)
    starts = torch.cumsum(torch.as_tensor([0, *segments[:-1]], device=device), 0)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(b, n) - starts[seg[order]])
    chosen = rank < counts.gather(1, seg.expand(b, n))
    token_present = present.gather(1, seg.expand(b, n))
    # Sort key: chosen tokens in [0, 1), other present tokens in [1, 2), absent tokens 2 (never kept: see `take`).
    key = torch.where(token_present, (~chosen).to(noise.dtype) + torch.rand_like(noise), torch.full_like(noise, 2.0))
    position = torch.empty_like(order)
    position.scatter_(1, key.argsort(1), torch.arange(n, device=device).expand(b, n))
    available = (present * torch.as_tensor(list(segments), device=device)).sum(1)
    take = torch.minimum(budget, available)
    return position < take[:, None]


__all__ = ["dirichlet_shares", "draw_budget", "draw_visible", "segment_ids"]
