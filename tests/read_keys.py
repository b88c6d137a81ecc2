"""Test helper run as its own process (plain python or under torchrun): stream shards, record keys and state.

    python tests/read_keys.py OUT.json SHARDS [--batches N] [--resume STATE.json] [--save STATE.json] [key=value...]

Writes {"rank", "world_size", "batches": [[keys of batch 0], ...], "pixel_sums": [[per image], ...], "skips"} to OUT.json (OUT.rankR.json
under torchrun). With torchrun it joins a gloo process group, as a training run would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

from polymodal.config import load_config
from polymodal.data.config import DataConfig
from polymodal.data.pipeline import ShardLoader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("shards")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batches", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--save")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    cfg = load_config(DataConfig, None, [f"shards=[{args.shards}]", *args.overrides])
    loader = ShardLoader(cfg)
    rank = loader.where.rank
    if args.resume:
        loader.load_state_dict(json.load(open(args.resume.replace("RANK", str(rank)))))
    batches, sums = [], []
    for _ in range(args.epochs):
        for batch in loader:
            batches.append(batch["__key__"])
            sums.append([int(x) for x in batch["rgb"].flatten(1).sum(1)] if "rgb" in batch else [])
            if args.batches and len(batches) >= args.batches:
                break
    if args.save:
        json.dump(loader.state_dict(), open(args.save.replace("RANK", str(rank)), "w"))
    out = args.out if "WORLD_SIZE" not in os.environ else args.out.replace(".json", f".rank{rank}.json")
    json.dump({"rank": rank, "world_size": loader.where.world_size, "batches": batches, "pixel_sums": sums,
               "skips": loader.skip_counts(), "workers": loader.num_workers}, open(out, "w"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
