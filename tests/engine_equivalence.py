"""Run under torchrun: train a few steps on fixed real batches through the Engine and save the losses.

Every rank takes its slice of the same global batches, so 1 rank with grad_accum=2 and 2 ranks with
grad_accum=1 see identical data per step and must reach the same losses (up to float summation order).
With --outputs, also save a checkpoint and the model's logits on a fixed batch (for the export test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from polymodal.pretrain.distributed import init_distributed, shutdown


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--outputs", help="run dir: save a checkpoint there and logits.pt on a fixed batch")
    args = parser.parse_args()

    world = init_distributed()
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement
    from polymodal.pretrain import checkpoint
    from polymodal.pretrain.config import load_pretrain_config
    from polymodal.pretrain.engine import Engine
    from polymodal.pretrain.objectives import build_objective

    micro = args.global_batch // 2
    cfg = load_pretrain_config("configs/engine-cifar10.yaml", [
        f"data.shards={args.shards}", f"data.batch_size={args.global_batch}", "data.num_workers=0",
        "data.shuffle_buffer=0", "data.augment=false", f"steps={args.steps}", f"zero_stage={args.zero_stage}",
        "optim.warmup_steps=0", "optim.lr=3e-3"])
    # The same global batches on every rank, read as a world of one.
    loader = iter(ShardLoader(cfg.data, where=Placement(0, 1)))
    global_batches = [next(loader) for _ in range(args.steps)]
    cfg.data.batch_size = micro
    cfg.grad_accum = 2 // world.world_size

    torch.manual_seed(0)
    objective = build_objective(cfg.objective)
    engine = Engine(cfg, objective, world)
    losses = []
    for batch in global_batches:
        parts = [{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()} for i in range(2)]
        mine = parts[world.rank::world.world_size]
        result = engine.step(iter(mine))
        (reduced,), _ = engine.reduce([result], False)
        losses.append(reduced.metrics["loss"])
    if args.outputs:
        run_dir = Path(args.outputs)
        meta = {"world_size": world.world_size, "zero_stage": args.zero_stage, "objective": cfg.objective}
        checkpoint.save(engine.ds, run_dir, args.steps, world.rank, {}, meta, keep=1)
        engine.module.eval()
        images = global_batches[0]["rgb"].float()
        with torch.no_grad():  # under ZeRO-3 the forward gathers the partitioned weights on every rank
            logits = engine.module.model((images - engine.module.mean) / engine.module.std)
        if world.is_main:
            torch.save(logits, run_dir / "logits.pt")
    if world.is_main:
        Path(args.out).write_text(json.dumps({"losses": losses, "world_size": world.world_size}))
    shutdown()


if __name__ == "__main__":
    main()
