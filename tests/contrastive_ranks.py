"""Run under torchrun (gloo, CPU): the clip/siglip objectives when ranks hold batches of different sizes, and FLOP
counting that must call no collective.

Uneven batches: the same real emoji samples are split 5 / 4 over two ranks (what the last batches of an epoch
look like without drop_last) and compared with one process holding all 9: the loss averaged over ranks (what the
engine logs) and the parameter gradients averaged over ranks (what DeepSpeed applies) must equal the single
process's. Rank 0 writes a JSON summary to argv[1]; with no process group it writes the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from polymodal.data.config import DataConfig
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.pretrain.flops import training_flops_per_sample
from polymodal.pretrain.objectives import build_objective

SPLIT = (5, 4)  # rows per rank; 9 in all
SETTINGS = {"clip": {"name": "clip"}, "clip_global": {"name": "clip", "local_loss": False},
            "clip_chunked": {"name": "clip", "chunk_size": 2}, "siglip": {"name": "siglip"}}


def samples(shards: str, tokenizer) -> dict:
    cfg = DataConfig(shards=shards, modalities=["rgb", "caption"], batch_size=sum(SPLIT), num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, image_size=64, augment=False)
    return next(iter(ShardLoader(cfg, tokenizer=tokenizer, where=Placement(0, 1))))


def loss_and_grads(setting: dict, shards: str, rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    objective = build_objective({"model": "polymodal-tiny-vit", **setting}).train()
    batch = samples(shards, objective.tokenizer())
    if world > 1:
        start = sum(SPLIT[:rank])
        batch = {k: v[start:start + SPLIT[rank]] for k, v in batch.items()}
    loss = objective(batch)["loss"]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}
    loss = loss.detach()
    if world > 1:  # what the engine logs (the mean over ranks) and what DeepSpeed applies (the mean gradient)
        dist.all_reduce(loss)
        loss /= world
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
    return float(loss), grads


def flops_without_collectives(shards: str) -> dict:
    """Count a clip batch's FLOPs with every collective patched to raise; then show the patch bites outside."""
    import torch.distributed.nn.functional as dist_nn

    from polymodal.pretrain.objectives import contrastive_loss

    torch.manual_seed(0)
    objective = build_objective({"name": "clip", "model": "polymodal-tiny-vit"})
    batch = samples(shards, objective.tokenizer())
    originals = {}

    def forbidden(*args, **kwargs):
        raise RuntimeError("collective called")

    targets = [(dist, name) for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
                                         "barrier", "all_gather_object", "reduce_scatter")]
    targets += [(dist_nn, "all_gather"), (contrastive_loss, "all_gather")]
    for owner, name in targets:
        originals[owner, name] = getattr(owner, name)
        setattr(owner, name, forbidden)
    try:
        counted = training_flops_per_sample(objective, batch)
        try:
            objective(batch)
            bites = False
        except RuntimeError as exc:
            bites = "collective called" in str(exc)
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    return {"flops_per_sample": counted, "patch_bites_outside_counting": bites}


def main() -> None:
    out, shards = sys.argv[1], sys.argv[2]
    world = 1
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        world = dist.get_world_size()
    rank = dist.get_rank() if world > 1 else 0
    summary = {"world_size": world, "losses": {}, "grads": {}}
    for label, setting in SETTINGS.items():
        loss, grads = loss_and_grads(setting, shards, rank, world)
        summary["losses"][label] = loss
        summary["grads"][label] = {n: g.tolist() for n, g in grads.items() if n in ("model.logit_scale",
                                   "model.text_projection", "model.visual.proj")} | {
            "__norms__": {n: float(g.norm()) for n, g in grads.items()}}
    if world > 1:
        summary["flops"] = flops_without_collectives(shards)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(summary, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
