"""Masking for the masked multimodal objectives (MultiMAE, 4M): how many tokens of each modality a sample's encoder
sees (and, for 4M, predicts), and which.

Everything here runs on the batch's device, vectorised over the batch (a few argsorts per call, no per-sample Python
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


def dirichlet_shares(present: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor,
                     sample_modalities_uniformly: bool = False) -> torch.Tensor:
    """Each sample's split of its budget across modalities, float [B, M], rows summing to 1 over the modalities it
    has (`present`, bool [B, M]); absent modalities get 0.

    A Dirichlet(alpha) draw per sample, renormalised over the present modalities (the Dirichlet restricted to a
    subset of its coordinates is again a Dirichlet with those alphas). `alpha` is one value, one per modality, or
    one per sample and modality ([B, M], a mixture's picks); an alpha of 0 means "never" (4M's rgb2all gives the
    other modalities 0 input share). With `sample_modalities_uniformly` (MultiMAE's option), a uniformly drawn
    non-empty subset of the present modalities shares the budget first."""
    b, m = present.shape
    concentration = torch.as_tensor(alpha, dtype=torch.float32, device=present.device).expand(b, m)
    # Gamma draws normalised = Dirichlet; torch samples them on the device. 1e-9 stands in for 0 (as 4M's eps).
    gammas = torch.distributions.Gamma(concentration.clamp_min(1e-9), torch.ones_like(concentration)).sample()
    keep = present & (concentration > 0)
    if sample_modalities_uniformly:
        # Rejection sampling of Bernoulli(0.5) subsets until non-empty: uniform over non-empty subsets.
        pick = torch.rand(b, m, device=present.device) < 0.5
        pick &= keep
        empty = ~pick.any(1) & keep.any(1)
        while empty.any():
            redraw = (torch.rand(b, m, device=present.device) < 0.5) & keep
            pick = torch.where(empty[:, None], redraw, pick)
            empty = ~pick.any(1) & keep.any(1)
        keep = pick
    weights = gammas * keep
    # A row where every kept Gamma underflowed to 0 (tiny alphas) gets an even split instead of 0/0.
    total = weights.sum(1, keepdim=True)
    even = keep.float() / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, weights / total.clamp_min(1e-30), even)


def mixture_shares(present: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """4M's mixture of Dirichlets: per sample, pick component k with probability `weights[k]` (float [K]), then draw
    its shares with `alphas[k]` (float [K, M]). Returns (shares [B, M], the picked components int64 [B]), so that a
    second draw (4M's target budget) can use the same components."""
    picks = torch.multinomial(weights.to(present.device, torch.float32), present.shape[0], replacement=True)
    return dirichlet_shares(present, alphas.to(present.device)[picks]), picks


def segment_ids(segments: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The modality index of each of the N tokens, int64 [N]."""
    return torch.repeat_interleave(torch.arange(len(segments), device=device),
                                   torch.as_tensor(list(segments), device=device))


def split_budget(shares: torch.Tensor, capacity: torch.Tensor, budget: torch.Tensor, spill: bool = True
                 ) -> torch.Tensor:
    """Token counts per sample and modality, int64 [B, M], from each sample's `budget` (int [B]) split by its
    `shares` (float [B, M]); no modality gets more than its `capacity` (int [B, M]; 0 for an absent modality).

    - `spill=True` (MultiMAE: exactly `num_visible` tokens): each sample gets exactly min(budget, its total
      capacity). A modality wants round(share * budget) of its capacity; the rounding, and any share a modality
      could not hold, is then settled by one argsort over every sample's capacity slots, which ranks the wanted
      slots first (in random order), then the other free slots (in random order), then slots beyond capacity.
    - `spill=False` (4M): the budget is split exactly by the largest-remainder rule (the counts sum to the budget,
      and a modality with share 0 gets none), then each count is clamped to its capacity; what a full modality
      could not hold is not handed to the others (so a caption that can take 9 tokens of its 30 does not push
      the other 21 into the image: the image gets its own share)."""
    b, m = shares.shape
    device = shares.device
    capacity = capacity.long().clamp_min(0)
    if not spill:
        exact = shares * budget[:, None]
        counts = exact.floor().long()
        # One more token for the modalities with the largest fractional parts, as many as the floors left over
        # (none for a modality without a share, and none in a row where nothing has a share).
        remainder = torch.where(shares.sum(1) > 0, budget - counts.sum(1), 0).clamp(0, m)
        fractions, order = (exact - counts).sort(1, descending=True)
        extra = ((torch.arange(m, device=device) < remainder[:, None]) & (fractions > 0)).long()
        counts = counts.scatter_add(1, order, extra)
        return counts.minimum(capacity)
    segments = capacity.amax(0) if b else torch.zeros(m, dtype=torch.long, device=device)
    seg = segment_ids(segments.tolist(), device)  # [S] the modality of each slot
    if seg.numel() == 0:
        return torch.zeros(b, m, dtype=torch.long, device=device)
    within = torch.arange(seg.numel(), device=device) - (segments.cumsum(0) - segments)[seg]
    free = within < capacity[:, seg]
    want = (shares * budget[:, None]).round().long().minimum(capacity)
    wanted = within < want[:, seg]  # the slots of one modality are interchangeable: its first `want` will do
    noise = torch.rand(b, seg.numel(), device=device)
    key = torch.where(free, (~wanted).to(noise.dtype) + noise, torch.full_like(noise, 2.0))
    position = torch.empty(b, seg.numel(), dtype=torch.long, device=device)
    position.scatter_(1, key.argsort(1), torch.arange(seg.numel(), device=device).expand(b, -1))
    taken = position < torch.minimum(budget.long(), capacity.sum(1))[:, None]
    return torch.zeros(b, m, dtype=torch.long, device=device).scatter_add_(1, seg.expand(b, -1), taken.long())


def random_ranks(batch_size: int, tokens: int, device: torch.device | str) -> torch.Tensor:
    """A uniformly random permutation of 0..tokens-1 per sample, int64 [B, tokens]: token i's rank."""
    return torch.rand(batch_size, tokens, device=device).argsort(1).argsort(1)


def draw_visible(present: torch.Tensor, segments: Sequence[int], budget: torch.Tensor,
                 alpha: float | Sequence[float] = 1.0, sample_modalities_uniformly: bool = False) -> torch.Tensor:
    """The tokens each sample's encoder sees, bool [B, N].

    - `present` bool [B, M]: which modalities each sample has (absent ones give no token);
    - `segments`: the token count of each modality (their tokens sit side by side in that order);
    - `budget` int [B]: visible tokens per sample. A sample gets exactly min(budget, tokens of its present
      modalities).

    The budget is split by a Dirichlet(alpha) draw (`dirichlet_shares`, `split_budget`); each modality's tokens are
    then drawn uniformly within it."""
    b, m = present.shape
    if len(segments) != m:
        raise ValueError(f"{m} modalities are marked present or absent, but {len(segments)} segments are given")
    device = present.device
    sizes = torch.as_tensor(list(segments), device=device)
    counts = split_budget(dirichlet_shares(present, alpha, sample_modalities_uniformly), present * sizes, budget)
    seg = segment_ids(segments, device)  # [N]
    # Each token's rank within its modality: sort by (modality, noise), then subtract the modality's start.
    n = seg.numel()
    order = (seg.float() + torch.rand(b, n, device=device)).argsort(1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(b, n) - (sizes.cumsum(0) - sizes)[seg[order]])
    return rank < counts.gather(1, seg.expand(b, n))


__all__ = ["dirichlet_shares", "draw_budget", "draw_visible", "mixture_shares", "random_ranks", "segment_ids",
           "split_budget"]
