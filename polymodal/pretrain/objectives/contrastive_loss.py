"""Contrastive losses across ranks: CLIP's InfoNCE and SigLIP's sigmoid loss.

Both follow open_clip's definitions (the parity tests compare values and gradients with `ClipLoss` and
`SigLipLoss`), with two memory savings open_clip lacks:
- local loss with gather-with-grad is the default: each rank scores its B rows against all N columns, so
  memory is O(B*N) per rank, not O(N^2);
- `chunk_size` rows at a time, each chunk recomputed in backward (activation checkpointing), so not even the
  B x N logits are held at once: memory O(chunk_size * N).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather
from torch.utils.checkpoint import checkpoint


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' features, concatenated in rank order. With grad, gradients flow back to the owning rank;
    without, only this rank's own slice keeps its gradient (as in open_clip)."""
    rank, world = _world()
    if world == 1:
        return features
    if with_grad:
        with warnings.catch_warnings():  # deprecated in favour of a private API; it still works and is public
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach())
    parts[rank] = features
    return torch.cat(parts, dim=0)


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
              local_loss: bool = True, gather_with_grad: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (features already normalised; logit_scale = exp(t))."""
    rank, world = _world()
    local = image.shape[0]
    all_image = gather(image, gather_with_grad)
    all_text = gather(text, gather_with_grad)

    def side(rows, columns, scale, bias, offset, a, b):
        targets = torch.arange(a, b, device=rows.device) + offset
        return _cross_entropy_sum(rows, columns, scale, bias, targets)

    if local_loss or world == 1:
        offset = local * rank if world > 1 else 0
        per_image = _rowwise(side, image, chunk_size, all_text, logit_scale, logit_bias, offset)
        per_text = _rowwise(side, text, chunk_size, all_image, logit_scale, logit_bias, offset)
        return (per_image + per_text) / (2 * local)
    total = all_image.shape[0]
    per_image = _rowwise(side, all_image, chunk_size, all_text, logit_scale, logit_bias, 0)
    per_text = _rowwise(side, all_text, chunk_size, all_image, logit_scale, logit_bias, 0)
    return (per_image + per_text) / (2 * total)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                chunk_size: int | None = None) -> torch.Tensor:
    """Sigmoid loss: every (image, text) pair of the global batch is a binary decision; this rank scores its
    images against all texts (gathered with grad), normalised by its local batch as in SigLIP."""
    rank, world = _world()
    local = image.shape[0]
    all_text = gather(text, with_grad=True)

    def block(rows, columns, scale, bias, a, b):
        logits = scale * rows @ columns.T + bias
        labels = -torch.ones_like(logits)
        positives = torch.arange(a, b, device=rows.device) + local * rank
        labels[torch.arange(b - a, device=rows.device), positives] = 1.0
        return -F.logsigmoid(labels * logits).sum()

    return _rowwise(block, image, chunk_size, all_text, logit_scale, logit_bias) / local
