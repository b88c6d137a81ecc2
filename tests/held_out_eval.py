"""Test helper run as its own process (plain python or under torchrun): the end-of-training evaluation.

    python tests/held_out_eval.py OUT.json DATASET_CACHE [--retrieval SPEC]... [--zeroshot SPEC]...

Loads the tiny open_clip model (random init, seed 0), joins a gloo process group under torchrun as a training run
would, runs `polymodal.eval.training_eval.evaluate_held_out` with distributed=True on every rank and writes
{"rank", "world_size", "metrics", "lines"} to OUT.json (OUT.rankR.json under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from polymodal.eval.encoders import load_seeded_encoder
from polymodal.eval.tasks import TaskOptions
from polymodal.eval.training_eval import evaluate_held_out

MODEL = "open_clip:polymodal-tiny-vit"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("dataset_cache")
    parser.add_argument("--retrieval", action="append", default=[])
    parser.add_argument("--zeroshot", action="append", default=[])
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    encoder = load_seeded_encoder(MODEL, None, 0, "cpu")
    opts = TaskOptions(batch_size=128, num_workers=1, progress=False, distributed=True)
    report = evaluate_held_out(encoder, args.retrieval, args.zeroshot, opts, dataset_cache=args.dataset_cache)
    out = args.out.replace(".json", f".rank{rank}.json") if world > 1 else args.out
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "world_size": world, "metrics": report.metrics, "lines": report.lines}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
