"""Tiny CLIP from scratch, same data and budget: `polymodal pretrain` vs open_clip's own training script.

Both trainers train polymodal-tiny-vit (ViT 64 px patch 8, 4+4 layers of width 256) from the same seed for the
same number of steps, batch, learning-rate schedule and augmentation (the settings benchmarks/clip_step.py uses:
AdamW lr 1e-3, weight decay 0.1, 15 warm-up steps then cosine, gradient clipping 1.0, RandomResizedCrop scale
0.9-1.0, no flip) and sample shuffle buffer (open_clip_train's 5,000, initial 1,000), each reading the mixed
image-text set with its own loader:

  emoji pairs (polymodal/demo_data/train/{0..2}, 1,500 pairs), ImageNet samples with WordNet glosses (1,000),
  2,000 CIFAR-10 and 2,000 Fashion-MNIST training images with captions made from their class names; built once by
  recipes/mixed-pairs.sh into --data-dir.

Each run's process wall time (start-up, loading, training, final checkpoint) is the budget it used. Afterwards
this script evaluates both final models with the same code (polymodal.eval), in this process:

  retrieval   text->image and image->text R@1/5/10 on the 411 held-out emoji pairs (demo shard 3)
  zero-shot   top-1 / top-5 on the CIFAR-10 and Fashion-MNIST test sets (10,000 each), CLIP_benchmark's
              class-embedding recipe with the writer's default prompt templates

Both are loaded as `polymodal eval` loads models: ours from its run folder (RUN_DIR/model.safetensors), open_clip's
as open_clip:polymodal-tiny-vit:checkpoints/epoch_1.pt (open_clip.create_model(..., pretrained=path)). The
claim to check: ours at least as good in no more wall-clock time.

Runs alternate order by round (ours first, then open_clip first ...) and each round uses the next seed (weights and
data order, the same for both trainers); the figures are per round and their mean.
The machine may be shared: the script waits for it to go quiet before each run and records the share of the
CPUs other processes used meanwhile.

    python benchmarks/clip_quality.py              # 1 round of 400 steps per trainer (about 25 minutes on 2 cores)
    python benchmarks/clip_quality.py --quick      # 30 steps each: a smoke run (the models are near chance)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import add_quiet_options, finish, machine_info, wait_quiet  # benchmarks/ is on sys.path as a script
from clip_step import ensure_peer_webdataset, run_ours, run_peer

REPO = Path(__file__).resolve().parent.parent
MODEL, IMAGE_SIZE = "polymodal-tiny-vit", 64
TRAIN = ["polymodal/demo_data/train/{0..2}.tar.gz", "{d}/imagenet/{0..3}.tar", "{d}/cifar10-pairs/{0..7}.tar",
         "{d}/fmnist-pairs/{0..7}.tar"]
HELD_OUT = "polymodal/demo_data/train/3.tar.gz"
# open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE / _INITIAL in open_clip_train/data.py), not our
# default 500: with shards of one source each, a 500-sample buffer makes most batches single-source (64 CIFAR-10
# captions over 10 class names), which changes what contrastive training learns. Same data means same mixing.
OURS_EXTRA = ("checkpoint.export=true", "data.shuffle_buffer=5000", "data.shuffle_initial=1000")
ZEROSHOT = {"CIFAR-10": "{d}/cifar10/test", "Fashion-MNIST": "{d}/fmnist/test"}


def ensure_data(data_dir: Path) -> str:
    """The '::'-joined training shard spec (both trainers accept it); builds the set once."""
    if not (data_dir / "fmnist" / "test" / "stats.json").exists():
        t0 = time.perf_counter()
        subprocess.run(["bash", str(REPO / "recipes" / "mixed-pairs.sh"), str(data_dir)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHON": sys.executable})
        print(f"[data] built the mixed set in {data_dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    specs = [s.replace("{d}", str(data_dir.resolve())) for s in TRAIN]
    return "::".join(str(REPO / s) if not s.startswith("/") else s for s in specs)


def evaluate(model, data_dir: Path, work: Path) -> dict:
    from polymodal.eval.datasets import resolve_dataset
    from polymodal.eval.tasks import TaskOptions, zeroshot_classification, zeroshot_retrieval

    opts = TaskOptions(num_workers=2, progress=False)
    out = {"retrieval": zeroshot_retrieval(model, resolve_dataset(str(REPO / HELD_OUT), cache_dir=work), opts)}
    for name, spec in ZEROSHOT.items():
        dataset = resolve_dataset(spec.replace("{d}", str(data_dir.resolve())), cache_dir=work)
        out[name] = zeroshot_classification(model, dataset, opts)
    return out


def load_models(ours_run_dir: str, peer_checkpoint: str):
    """Both through `polymodal eval`'s model specs: our run folder, open_clip's checkpoint file."""
    from polymodal.eval.encoders import load_encoder

    return load_encoder(ours_run_dir, IMAGE_SIZE), load_encoder(f"open_clip:{MODEL}:{peer_checkpoint}", IMAGE_SIZE)


def headline(result: dict) -> dict:
    """The figures the table shows, in percent."""
    r = result["retrieval"]
    row = {f"t2i R@{k}": 100 * r[f"image_retrieval_recall@{k}"] for k in (1, 5)}
    row.update({f"i2t R@{k}": 100 * r[f"text_retrieval_recall@{k}"] for k in (1, 5)})
    for name in ZEROSHOT:
        row[f"{name} top-1"] = 100 * result[name]["acc1"]
        row[f"{name} top-5"] = 100 * result[name]["acc5"]
    return row


def print_table(rounds: list[dict]) -> dict:
    columns = list(rounds[0]["ours"]["figures"])
    means = {t: {c: statistics.fmean(r[t]["figures"][c] for r in rounds) for c in columns} for t in ("ours", "open_clip")}
    walls = {t: statistics.fmean(r[t]["wall_s"] for r in rounds) for t in ("ours", "open_clip")}
    print(f"\n{'trainer':<11}{'wall s':>8}" + "".join(f"{c:>20}" for c in columns))
    for trainer in ("ours", "open_clip"):
        print(f"{trainer:<11}{walls[trainer]:>8.0f}" + "".join(f"{means[trainer][c]:>19.1f}%" for c in columns))
    better = sum(means["ours"][c] >= means["open_clip"][c] for c in columns)
    print(f"\nwall-clock ours/open_clip: {walls['ours'] / walls['open_clip']:.2f}; ours >= open_clip on {better} of "
          f"{len(columns)} figures (means over {len(rounds)} round(s))")
    return {"mean": means, "wall_s": walls, "ours_at_least_as_good": better, "figures": len(columns)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 400, quick 30)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data workers of both trainers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPUs)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of one run per trainer, order alternating")
    parser.add_argument("--seed", type=int, default=0, help="seed of round 1; round r uses seed + r - 1")
    parser.add_argument("--data-dir", default="bench-out/mixed", help="the mixed set (built there once)")
    parser.add_argument("--peer-webdataset", default="/tmp/wds0286",
                        help="webdataset 0.2.86 for open_clip_train (installed there if missing)")
    parser.add_argument("--work-dir", default="bench-out/clip-quality", help="run folders and logs")
    parser.add_argument("--out", default="bench-out/clip_quality.json", help="JSON report")
    add_quiet_options(parser)
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the plumbing, not the quality")
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 400)
    # The fields benchmarks/clip_step.py's trainer commands read.
    args.model, args.image_size, args.precision, args.peak_flops = MODEL, IMAGE_SIZE, "fp32", None
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.run_steps = -(-steps // args.workers) * args.workers  # open_clip_train: same batches per worker
    t_start = time.perf_counter()

    data_dir = Path(args.data_dir)
    shards = ensure_data(data_dir)
    wds_dir = Path(args.peer_webdataset)
    wds_version = ensure_peer_webdataset(wds_dir)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"[setup] {MODEL}, batch {args.batch_size}, {args.run_steps} steps, {args.workers} workers, "
          f"{args.threads} threads; data {shards}", flush=True)

    rounds = []
    for rnd in range(args.rounds):
        order = ("ours", "open_clip") if rnd % 2 == 0 else ("open_clip", "ours")
        # Each round is a new seed (weights and data order) for both trainers, so the means average over seeds.
        seeded = argparse.Namespace(**{**vars(args), "seed": args.seed + rnd})
        runs = {}
        for trainer in order:
            waited = wait_quiet(args.max_other_load, args.max_wait)
            tag = f"r{rnd + 1}"
            run = (run_ours(seeded, shards, work, tag, extra=OURS_EXTRA + (f"data.seed={seeded.seed}",))
                   if trainer == "ours" else run_peer(seeded, shards, work, tag, wds_dir))
            run["waited_s"], run["seed"] = waited, seeded.seed
            print(f"[round {rnd + 1}] {trainer:<9} {run['wall_s']:.0f}s wall, final loss "
                  f"{run['steps'][-1]['loss']:.3f}, other processes "
                  f"{100 * (run['other_load'] or 0):.0f}% of the CPUs", flush=True)
            runs[trainer] = run
        ours_model, peer_model = load_models(runs["ours"]["run_dir"], runs["open_clip"]["checkpoint"])
        for trainer, model in (("ours", ours_model), ("open_clip", peer_model)):
            runs[trainer]["eval"] = evaluate(model, data_dir, work)
            runs[trainer]["figures"] = headline(runs[trainer]["eval"])
        rounds.append(runs)
    summary = print_table(rounds)
    report = {
        "benchmark": "benchmarks/clip_quality.py",
        "what": "tiny CLIP from scratch on the mixed image-text set: held-out retrieval and zero-shot quality of "
                "`polymodal pretrain` vs open_clip_train.main after the same steps, with each one's wall time",
        "settings": {"model": MODEL, "image_size": IMAGE_SIZE, "steps": args.run_steps, "batch_size": args.batch_size,
                     "workers": args.workers, "threads": args.threads, "rounds": args.rounds, "seed": args.seed},
        "shards": shards, "held_out": HELD_OUT, "peer_webdataset": wds_version,
        "machine": machine_info("torch", "open_clip"),
        "summary": summary,
        "rounds": [{t: {k: v for k, v in run.items() if k != "steps"} | {"final_loss": run["steps"][-1]["loss"]}
                    for t, run in r.items()} for r in rounds],
    }
    return finish(args.out, report, t_start, f"logs and run folders in {work}")


if __name__ == "__main__":
    sys.exit(main())
