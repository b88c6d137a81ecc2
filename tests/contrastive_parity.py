"""Run alone or under torchrun: our CLIP/SigLIP losses against open_clip's on the same features.

Each rank draws its own features from a seed; for every setting the loss value and the gradients with respect
to the image features, text features, logit scale (and bias) must match. Rank 0 writes a JSON summary.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from polymodal.pretrain.objectives.contrastive_loss import clip_loss, siglip_loss


def features(rank: int, batch: int = 6, dim: int = 16):
    g = torch.Generator().manual_seed(100 + rank)
    image = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor([10.0], dtype=torch.float64)
    bias = torch.tensor([-5.0], dtype=torch.float64)
    return [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]


def grads(loss_fn, rank):
    inputs = features(rank)
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach(), [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in inputs]


def main() -> None:
    world = 1
    if "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
        world = dist.get_world_size()
    rank = dist.get_rank() if world > 1 else 0
    results = []
    for local_loss in (True, False):
        for chunk in (None, 4):
            theirs = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
            ref_loss, ref_grads = grads(lambda i, t, s, b: theirs(i, t, s), rank)
            our_loss, our_grads = grads(lambda i, t, s, b: clip_loss(i, t, s, local_loss=local_loss,
                                                                     chunk_size=chunk), rank)
            results.append(("clip", local_loss, chunk, ref_loss, our_loss, ref_grads, our_grads))
    for chunk in (None, 4):
        theirs = SigLipLoss(rank=rank, world_size=world)
        ref_loss, ref_grads = grads(lambda i, t, s, b: theirs(i, t, s, b), rank)
        our_loss, our_grads = grads(lambda i, t, s, b: siglip_loss(i, t, s, b, chunk_size=chunk), rank)
        results.append(("siglip", None, chunk, ref_loss, our_loss, ref_grads, our_grads))
    summary = []
    for name, local_loss, chunk, ref_loss, our_loss, ref_grads, our_grads in results:
        loss_diff = abs(float(ref_loss - our_loss))
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(ref_grads, our_grads))
        summary.append({"loss": name, "local_loss": local_loss, "chunk": chunk, "value": float(our_loss),
                        "loss_diff": loss_diff, "grad_diff": grad_diff, "rank": rank})
    if world > 1:
        everything = [None] * world
        dist.all_gather_object(everything, summary)
        summary = [row for part in everything for row in part]
        dist.destroy_process_group()
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()
