"""Contrastive losses across ranks: CLIP's InfoNCE and SigLIP's sigmoid loss.

Both follow open_clip's definitions (the parity tests compare values and gradients with `ClipLoss` and
`SigLipLoss`), with savings and a generalisation open_clip lacks:
- local loss with gather-with-grad is the default: each rank scores its B rows against all N columns, so
  memory is O(B*N) per rank, not O(N^2);
- `chunk_size` rows at a time, each chunk recomputed in backward (activation checkpointing), so not even the
  B x N logits are held at once: memory O(chunk_size * N);
- ranks may hold batches of different sizes (the last batches of an epoch without drop_last): given every rank's
  size (`batch_sizes`), features are padded to the largest for the all-gather and cut back after it, targets are
  offset by the sizes of the ranks before, and the loss is normalised so that the gradient DeepSpeed averages
  over ranks is the gradient of the mean over the whole global batch, as one rank holding all of it would get.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather
from torch.utils.checkpoint import checkpoint

from polymodal.distributed import collective_world


def batch_sizes(local: int, device: torch.device) -> list[int]:
    """Every rank's batch size, in rank order (one small all-gather; the host waits for it)."""
    _, world = collective_world()
    if world == 1:
        return [local]
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [int(p) for p in torch.cat(parts).tolist()]


def gather(features: torch.Tensor, with_grad: bool, sizes: list[int] | None = None) -> torch.Tensor:
    """All ranks' features, concatenated in rank order. With grad, gradients flow back to the owning rank;
    without, only this rank's own slice keeps its gradient (as in open_clip). `sizes`: every rank's row count,
    when they may differ (None: all equal to this rank's)."""
    rank, world = collective_world()
    if world == 1:
        return features
    largest = max(sizes) if sizes else features.shape[0]
    padded = F.pad(features, (0, 0, 0, largest - features.shape[0])) if largest > features.shape[0] else features
    if with_grad:
        with warnings.catch_warnings():  # deprecated in favour of a private API; it still works and is public
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.detach())
        parts[rank] = padded
    if sizes:
        parts = [part[:size] for part, size in zip(parts, sizes)]
    return torch.cat(parts, dim=0)


def _layout(local: int, sizes: list[int] | None) -> tuple[int, int, int]:
    """(offset of this rank's rows in the global batch, global batch size, world size)."""
    rank, world = collective_world()
    sizes = sizes or [local] * world
    return sum(sizes[:rank]), sum(sizes), world


def _row_chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    size = n if not chunk_size or chunk_size >= n else chunk_size
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _cross_entropy_sum(rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, bias, targets: torch.Tensor):
    logits = scale * rows @ columns.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, targets, reduction="sum")


def _rowwise(fn, rows: torch.Tensor, chunk_size: int | None, *args) -> torch.Tensor:
    """Sum fn(rows[a:b], ...) over row chunks; with several chunks each is recomputed in backward."""
    chunks = _row_chunks(rows.shape[0], chunk_size)
    if len(chunks) == 1:
        return fn(rows, *args, 0, rows.shape[0])
    return sum(checkpoint(fn, rows[a:b], *args, a, b, use_reentrant=False) for a, b in chunks)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias=None,
              local_loss: bool = True, gather_with_grad: bool = True, chunk_size: int | None = None,
              sizes: list[int] | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (features already normalised; logit_scale = exp(t)). `sizes`:
    every rank's batch size when they may differ (see `batch_sizes`)."""
    offset, total, world = _layout(image.shape[0], sizes)
    all_image = gather(image, gather_with_grad, sizes)
    all_text = gather(text, gather_with_grad, sizes)

    def side(rows, columns, scale, bias, offset, a, b):
        targets = torch.arange(a, b, device=rows.device) + offset
        return _cross_entropy_sum(rows, columns, scale, bias, targets)

    if local_loss or world == 1:
        per_image = _rowwise(side, image, chunk_size, all_text, logit_scale, logit_bias, offset)
        per_text = _rowwise(side, text, chunk_size, all_image, logit_scale, logit_bias, offset)
        # DeepSpeed averages gradients over ranks: scaled by world / total, this rank's sum becomes its share of
        # the global mean (with equal batches, the mean over its own rows, as in open_clip).
        return (per_image + per_text) * world / (2 * total)
    per_image = _rowwise(side, all_image, chunk_size, all_text, logit_scale, logit_bias, 0)
    per_text = _rowwise(side, all_text, chunk_size, all_image, logit_scale, logit_bias, 0)
    return (per_image + per_text) / (2 * total)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                chunk_size: int | None = None, sizes: list[int] | None = None) -> torch.Tensor:
    """Sigmoid loss: every (image, text) pair of the global batch is a binary decision; this rank scores its
    images against all texts (gathered with grad), normalised by its local batch as in SigLIP (by its share of
    the global batch when ranks hold different sizes)."""
    offset, total, world = _layout(image.shape[0], sizes)
    all_text = gather(text, with_grad=True, sizes=sizes)

    def block(rows, columns, scale, bias, a, b):
        logits = scale * rows @ columns.T + bias
        labels = -torch.ones_like(logits)
        positives = torch.arange(a, b, device=rows.device) + offset
        labels[torch.arange(b - a, device=rows.device), positives] = 1.0
        return -F.logsigmoid(labels * logits).sum()

    return _rowwise(block, image, chunk_size, all_text, logit_scale, logit_bias) * world / total
