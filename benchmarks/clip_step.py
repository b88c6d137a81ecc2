"""CLIP training throughput: `polymodal pretrain` (objective clip) vs open_clip's own training script.

Both trainers run as they are used, as subprocesses of this script, on the same model, data, batch size,
precision, number of data-loader workers and torch threads, and both read their data from WebDataset shards
with their own loaders (so the figures are end to end: loading, forward, backward, optimizer step, logging):

  ours       python -m polymodal pretrain configs/demo.yaml steps=N data.batch_size=B data.num_workers=W ...
             (DeepSpeed ZeRO 0 on one process); per-step figures from RUN_DIR/metrics.jsonl
  open_clip  open_clip_train.main (the package open_clip_train, as `python -m open_clip_train.main` runs it, through
             a two-line wrapper that first imports polymodal.models.open_clip_towers, which registers our tiny
             config polymodal-tiny-vit with open_clip) with --dataset-type webdataset --dataset-resampled
             --log-every-n-steps 1; per-step figures parsed from its log lines ("Data (t)", "Batch (t)", samples/s)

open_clip_train fails on its first batch with webdataset 1.x (KeyError 'fname'), so its runs import
webdataset 0.2.86 from --peer-webdataset (default /tmp/wds0286; installed there with `pip install --no-deps
--target DIR webdataset==0.2.86` if missing) through PYTHONPATH. Ours uses the venv's webdataset.

Settings (both trainers): AdamW lr 1e-3, weight decay 0.1, betas (0.9, 0.98), eps 1e-6, 15 warm-up steps then
cosine, gradient clipping at 1.0; RandomResizedCrop to the model's size with scale 0.9-1.0 (open_clip's default)
and no flip; resampled shards (sampling with replacement, no epoch end); no TensorBoard (open_clip_train's
default; ours is turned off with log.tensorboard=false); no evaluation. Each run ends with a checkpoint, after the
timed steps.

  CPU (default when no GPU): polymodal-tiny-vit (ViT 64 px patch 8, 4+4 layers of width 256, 19.2 M
      parameters), batch 128, fp32, 2 workers, on the emoji demo shards polymodal/demo_data/train/{0..3}.tar.gz
      (1,911 real image-caption pairs, 64 px PNG).
  GPU (when torch.cuda.is_available()): ViT-B-16 at 224 px, bf16 (ours precision=bf16: DeepSpeed bf16 weights with
      fp32 master weights; open_clip --precision amp_bf16: autocast over fp32 weights), batch 256 per GPU, 8 workers,
      on the imagenet-samples photos (--data imagenet: 1,000 real ImageNet JPEGs, median 500x375, caption
      "<label>: <WordNet gloss>"), written once into --shards-dir with `polymodal data shards`. Real photos make
      the loaders decode and crop realistic images; --data emoji runs the 64 px emoji (upscaled to 224) instead,
      which takes JPEG decoding out of the picture. The data-wait columns show whether a loader held a trainer back.

Timing: --rounds rounds, each with one run of both trainers in alternating order (ours, open_clip, open_clip,
ours, ...), every run --warmup + --steps steps (rounded up to a multiple of --workers, as open_clip_train gives
each worker the same number of batches); the first --warmup steps of each run (worker start-up, shuffle buffers
filling, allocator warm-up) are left out. Per-step time is wall time per iteration: ours, the interval
between consecutive metrics.jsonl records (their `time`); open_clip, its Batch (t) (the time between the ends of
consecutive iterations, read at full precision as batch / samples-per-second). Both therefore include that step's
share of logging. Figures are medians over all timed steps of all runs; the ratio ours/open_clip is of samples/s
(higher is better: the issue's goal on a GPU is >= 1.5x); the per-round ratios show its spread.

Data wait: ours, the `data_wait` fraction of each step (time blocked on the loader); open_clip, Data (t) / Batch (t)
(time from the end of the last iteration to the batch being on the device, which also holds the previous step's
logging, and, on a GPU, waiting for the previous step's kernels, as it logs the loss with .item() every step).

FLOP/s and MFU: ours logs flops_per_s (training_flops_per_sample: 3x the forward FLOPs torch counts) and, on known
GPUs, mfu; FLOPs per sample = flops_per_s / samples_per_s, and the peak = flops_per_s / mfu (or --peak-flops).
Both trainers run the same model on the same input sizes, so both get the same FLOPs per sample; FLOP/s and MFU
are that times each one's median samples/s.

The machine may be shared: before each run the script waits (up to --max-wait s) for other processes to use at
most --max-other-load of the CPUs, measures what share they used during the run, and redoes a disturbed run up to
--retries times; the table marks runs that stayed disturbed. Figures depend on the machine: compare them only
from the same one.

    python benchmarks/clip_step.py            # full run: 2 rounds x 2 runs of 26 steps (6-20 minutes on 2 cores)
    python benchmarks/clip_step.py --quick    # smoke run: 1 round of 6 steps each
    TORCH_EXTENSIONS_DIR=/tmp/torch_ext python benchmarks/clip_step.py   # reuse DeepSpeed's built ops
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import OtherLoad, add_quiet_options, finish, machine_info, wait_quiet  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
GPU_GOAL = 1.5  # ours/open_clip samples/s on a GPU (the goal)
TRAINERS = ("ours", "open_clip")
DATA = {
    "emoji": "polymodal/demo_data/train/{0..3}.tar.gz",
}
PEER_WRAPPER = (
    "import sys\n"
    "import polymodal.models.open_clip_towers  # registers polymodal-tiny-vit with open_clip\n"
    "from open_clip_train.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
PEER_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), "
                       r"([\d.eE+-]+)/s, .*?Loss: ([\d.naif]+)")
# Shared hyper-parameters (ours: config overrides; open_clip: flags).
LR, WD, WARMUP_LR_STEPS, GRAD_CLIP, SCALE = 1e-3, 0.1, 15, 1.0, (0.9, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Setup


def resolve_settings(args, gpu: bool) -> None:
    args.model = args.model or ("ViT-B-16" if gpu else "polymodal-tiny-vit")
    args.image_size = args.image_size or (224 if gpu else 64)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.batch_size = args.batch_size or (256 if gpu else 128)
    args.workers = args.workers or (8 if gpu else 2)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.data = args.data or ("imagenet" if gpu else "emoji")
    args.steps = args.steps or (4 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 2)
    total = args.warmup + args.steps
    # open_clip_train gives each worker ceil(batches / workers) batches: keep the count a multiple of the workers
    args.run_steps = -(-total // args.workers) * args.workers


def ensure_data(args) -> str:
    """The shard pattern both trainers read (absolute, with braces)."""
    if args.data == "emoji":
        return str(REPO / DATA["emoji"])
    out = Path(args.shards_dir)
    if not ((out / "stats.json").exists() and any(out.glob("*.tar"))):
        source = Path(args.data_root) / "imagenet-samples" / "captions_wordnet.jsonl"
        if not source.exists():
            sys.exit(f"{source} not found: pass --data-root (the folder holding imagenet-samples/) or --data emoji")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out), "--caption",
                        "{label}: {gloss}", "--samples-per-shard", "125", "--overwrite", "-q"], check=True, cwd=REPO)
        print(f"[data] wrote imagenet-samples shards to {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    shards = sorted(out.glob("*.tar"), key=lambda p: int(p.name.split(".")[0]))
    return str(out.resolve() / f"{{0..{len(shards) - 1}}}.tar")


def ensure_peer_webdataset(folder: Path) -> str:
    """A webdataset 0.2.x that open_clip_train works with, importable only by the open_clip runs."""
    probe = [sys.executable, "-c", "import webdataset; print(webdataset.__version__, webdataset.__file__)"]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    found = subprocess.run(probe, env=env, capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.startswith("0.2.") or str(folder) not in found.stdout:
        print(f"[setup] installing webdataset==0.2.86 into {folder} for open_clip_train", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                        "webdataset==0.2.86"], check=True)
        found = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    return found.stdout.split()[0]


# ---------------------------------------------------------------------------------------------------------------
# The two trainers


def base_env(args) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ours_command(args, shards: str, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "polymodal", "pretrain", str(REPO / "configs" / "demo.yaml"),
           f"run_dir={run_dir}", f"steps={args.run_steps}", f"data.shards={shards}",
           f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
           f"data.image_size={args.image_size}", f"data.crop_scale=[{SCALE[0]},{SCALE[1]}]", "data.hflip=0.0",
           "data.resampled=true", f"objective.model={args.model}", f"precision={args.precision}", "zero_stage=0",
           f"optim.lr={LR}", f"optim.weight_decay={WD}", f"optim.warmup_steps={WARMUP_LR_STEPS}",
           f"grad_clip={GRAD_CLIP}", f"seed={args.seed}", "evaluate.retrieval_shards=null", "checkpoint.every=0",
           "checkpoint.export=false", "log.progress=false", "log.tensorboard=false", "log.every=1"]
    return cmd + ([f"peak_flops={args.peak_flops}"] if args.peak_flops else []) + list(extra)


def peer_command(args, shards: str, logs: Path) -> list[str]:
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    return [sys.executable, "-c", PEER_WRAPPER, "--model", args.model, "--train-data", shards,
            "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(args.run_steps * args.batch_size), "--epochs", "1",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", precision,
            "--lr", str(LR), "--wd", str(WD), "--warmup", str(WARMUP_LR_STEPS), "--grad-clip-norm", str(GRAD_CLIP),
            "--aug-cfg", f"scale=({SCALE[0]},{SCALE[1]})", "--force-image-size", str(args.image_size),
            "--log-every-n-steps", "1", "--seed", str(args.seed), "--logs", str(logs), "--name", "run",
            "--report-to", ""]


def launch(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float | None]:
    """Run a trainer; returns (wall seconds, share of the CPUs other processes used meanwhile)."""
    load = OtherLoad(self_too=False)  # the trainer and its reaped data workers are ours; this process only waits
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{cmd[:4]}... exited with {proc.returncode}; last lines of {log_path}:\n" + "\n".join(tail))
    return wall, load.share(wall)


def run_ours(args, shards: str, work: Path, tag: str, extra: tuple[str, ...] = ()) -> dict:
    run_dir = work / f"ours-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = work / f"ours-{tag}.log"
    wall, other = launch(ours_command(args, shards, run_dir, extra), base_env(args), log_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = []
    for prev, rec in zip([None] + records[:-1], records):
        self_timed = rec["samples_per_s"] and args.batch_size / rec["samples_per_s"]
        interval = rec["time"] - prev["time"] if prev else self_timed
        steps.append({"step": rec["step"], "step_s": interval, "self_timed_s": self_timed,
                      "data_wait": rec["data_wait"], "loss": rec["loss"],
                      "flops_per_sample": rec["flops_per_s"] / rec["samples_per_s"],
                      "peak": rec["flops_per_s"] / rec["mfu"] if rec.get("mfu") else None})
    params = re.search(r"objective clip, ([\d.]+) M parameters", log_path.read_text(errors="replace"))
    return {"trainer": "ours", "tag": tag, "wall_s": wall, "other_load": other, "log": str(log_path),
            "run_dir": str(run_dir), "params_m": float(params.group(1)) if params else None, "steps": steps}


def run_peer(args, shards: str, work: Path, tag: str, wds_dir: Path) -> dict:
    logs = work / f"open_clip-{tag}"
    shutil.rmtree(logs, ignore_errors=True)
    log_path = work / f"open_clip-{tag}.log"
    env = {**base_env(args), "PYTHONPATH": str(wds_dir)}
    wall, other = launch(peer_command(args, shards, logs), env, log_path)
    steps = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = PEER_LINE.search(line)
        if m:
            seen, data_t, batch_t, per_s, loss = m.groups()
            step_s = args.batch_size / float(per_s)  # Batch (t) at full precision
            steps.append({"step": int(seen) // args.batch_size, "step_s": step_s, "batch_t_logged": float(batch_t),
                          "data_s": float(data_t), "data_wait": min(1.0, float(data_t) / step_s),
                          "loss": float(loss)})
    if len(steps) != args.run_steps:
        raise RuntimeError(f"open_clip_train logged {len(steps)} steps, expected {args.run_steps}; see {log_path}")
    return {"trainer": "open_clip", "tag": tag, "wall_s": wall, "other_load": other, "log": str(log_path),
            "checkpoint": str(logs / "run" / "checkpoints" / "epoch_1.pt"), "steps": steps}


# ---------------------------------------------------------------------------------------------------------------
# Report


def summarize(args, runs: dict[str, list[dict]], flops_per_sample: float | None, peak: float | None) -> dict:
    out = {}
    for name in TRAINERS:
        timed = [s for r in runs[name] for s in r["steps"][args.warmup:]]
        med = statistics.median(s["step_s"] for s in timed)
        per_s = args.batch_size / med
        flops = flops_per_sample * per_s if flops_per_sample else None
        out[name] = {
            "step_s_median": med, "step_s_mean": statistics.fmean(s["step_s"] for s in timed),
            "run_medians_s": [statistics.median(s["step_s"] for s in r["steps"][args.warmup:]) for r in runs[name]],
            "samples_per_s": per_s, "samples_per_s_per_gpu": per_s,  # one process, one device
            "data_wait_median": statistics.median(s["data_wait"] for s in timed),
            "data_wait_mean": statistics.fmean(s["data_wait"] for s in timed),
            "flops_per_s": flops, "mfu": flops / peak if flops and peak else None, "steps_timed": len(timed),
            "other_load": [r["other_load"] for r in runs[name]],
        }
        if name == "ours":
            out[name]["self_timed_s_median"] = statistics.median(s["self_timed_s"] for s in timed)
        else:
            out[name]["data_s_median"] = statistics.median(s["data_s"] for s in timed)
    per_round = [statistics.median(s["step_s"] for s in p["steps"][args.warmup:])
                 / statistics.median(s["step_s"] for s in o["steps"][args.warmup:])
                 for o, p in zip(runs["ours"], runs["open_clip"])]
    ratio = out["ours"]["samples_per_s"] / out["open_clip"]["samples_per_s"]
    return {"trainers": out, "ratio": ratio, "ratio_per_round": per_round,
            "ratio_spread": [min(per_round), max(per_round)], "gpu_goal": GPU_GOAL,
            "gpu_goal_met": ratio >= GPU_GOAL if args.gpu else None}


def print_table(args, res: dict, meta: dict) -> None:
    t = res["trainers"]
    peak = meta["peak_flops"]
    print(f"\n{args.model} at {args.image_size} px, batch {args.batch_size}, {args.precision} on {meta['device']}, "
          f"{args.threads} torch threads, {args.workers} data workers; {args.data} shards; {args.rounds} round(s) "
          f"x {args.run_steps - args.warmup} timed steps per trainer after {args.warmup} warm-up steps; medians of "
          f"per-step wall times, loading included.")
    header = (f"{'trainer':10s}{'step ms':>9s}{'[run medians]':>18s}{'samples/s':>11s}{'data wait':>11s}"
              f"{'GFLOP/s':>10s}" + (f"{'MFU':>8s}" if peak else "") + f"{'other load':>12s}")
    print(header)
    print("-" * len(header))
    for name in TRAINERS:
        r = t[name]
        rm = r["run_medians_s"]
        loads = [v for v in r["other_load"] if v is not None]
        print(f"{name:10s}{1e3 * r['step_s_median']:9.0f}{f'[{1e3 * min(rm):.0f}-{1e3 * max(rm):.0f}]':>18s}"
              f"{r['samples_per_s']:11.1f}{100 * r['data_wait_median']:10.1f}%"
              + (f"{r['flops_per_s'] / 1e9:10.1f}" if r["flops_per_s"] else f"{'?':>10s}")
              + (f"{100 * r['mfu']:7.1f}%" if peak else "")
              + (f"{'  ' + '/'.join(f'{100 * v:.0f}%' for v in loads):>12s}" if loads else ""))
    lo, hi = res["ratio_spread"]
    goal = (f"; GPU goal >= {GPU_GOAL}x: {'met' if res['gpu_goal_met'] else 'NOT met'}" if args.gpu
            else f" (the >= {GPU_GOAL}x goal is for the GPU run)")
    print(f"\nours/open_clip samples/s: {res['ratio']:.2f}x (per round {lo:.2f}-{hi:.2f}){goal}")
    ours, peer = t["ours"], t["open_clip"]
    print(f"data wait: ours {100 * ours['data_wait_median']:.1f}% of each step (median; mean "
          f"{100 * ours['data_wait_mean']:.1f}%); open_clip Data (t) {1e3 * peer['data_s_median']:.0f} ms median "
          f"({100 * peer['data_wait_median']:.1f}% of the step; mean {100 * peer['data_wait_mean']:.1f}%)")
    if not peak:
        print("MFU: no peak FLOP/s known for this device (pass --peak-flops)")


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="open_clip model config (default: polymodal-tiny-vit on CPU, ViT-B-16 on a GPU)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: 64 on CPU, 224 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="per process (default: 128 on CPU, 256 on a GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 on CPU, bf16 on a GPU (open_clip: amp_bf16)")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default: 2 on CPU, 8 on a GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of both trainers (default: the usable CPUs)")
    parser.add_argument("--data", choices=["emoji", "imagenet"], default=None,
                        help="emoji demo shards or imagenet-samples photos (default: emoji on CPU, imagenet on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 20, quick: 4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out at the start of each run (default: 5, quick: 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of one run per trainer, order alternating (default: 2, quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of the device for MFU (default: ours' lookup for known GPUs)")
    add_quiet_options(parser, "redone (--retries)")
    parser.add_argument("--retries", type=int, default=None,
                        help="extra tries of a disturbed run (default: 1, quick: 0)")
    parser.add_argument("--peer-webdataset", default="/tmp/wds0286",
                        help="folder with webdataset 0.2.86 for open_clip_train (installed if missing; "
                             "default: %(default)s)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding imagenet-samples/ (default: %(default)s)")
    parser.add_argument("--shards-dir", default="bench-out/imagenet-samples-shards",
                        help="imagenet-samples shards, written there once (default: %(default)s)")
    parser.add_argument("--work-dir", default="bench-out/clip-step",
                        help="run folders and logs of both trainers (default: %(default)s)")
    parser.add_argument("--out", default="bench-out/clip_step.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1 round of a few steps: a smoke run (noisy)")
    args = parser.parse_args(argv)
    if args.retries is None:
        args.retries = 0 if args.quick else 1
    t_start = time.perf_counter()

    import torch

    args.gpu = torch.cuda.is_available()
    resolve_settings(args, args.gpu)
    device = f"cuda ({torch.cuda.get_device_name(0)})" if args.gpu else "cpu"
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        sys.exit("open_clip_train is not installed: pip install 'open_clip_torch[training]'")
    import pandas  # noqa: F401  (open_clip_train's data module needs it)

    wds_version = ensure_peer_webdataset(Path(args.peer_webdataset))
    shards = ensure_data(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"[setup] {args.model} {args.image_size} px, batch {args.batch_size}, {args.precision}, {args.workers} "
          f"workers, {args.threads} threads; {args.run_steps} steps per run; data {shards}; open_clip_train with "
          f"webdataset {wds_version}", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in TRAINERS}
    for rnd in range(args.rounds):
        order = TRAINERS if rnd % 2 == 0 else TRAINERS[::-1]
        for name in order:
            for attempt in range(1 + args.retries):
                waited = wait_quiet(args.max_other_load, args.max_wait)
                load_before = os.getloadavg()[0]
                tag = f"r{rnd + 1}" + (f"-try{attempt + 1}" if attempt else "")
                r = (run_ours(args, shards, work, tag) if name == "ours"
                     else run_peer(args, shards, work, tag, Path(args.peer_webdataset)))
                r.update(waited_s=waited, attempt=attempt + 1, load_avg_before=load_before,
                         load_avg_after=os.getloadavg()[0])
                timed = [s["step_s"] for s in r["steps"][args.warmup:]]
                disturbed = r["other_load"] is not None and r["other_load"] > args.max_other_load
                r["disturbed"] = disturbed
                print(f"[round {rnd + 1}/{args.rounds}] {name:9s} {1e3 * statistics.median(timed):7.0f} ms/step "
                      f"({args.batch_size / statistics.median(timed):6.1f} samples/s) over {len(timed)} steps, "
                      f"data wait {100 * statistics.median(s['data_wait'] for s in r['steps'][args.warmup:]):4.1f}%"
                      f"; run {r['wall_s']:.0f}s, load avg {r['load_avg_before']:.2f}->{r['load_avg_after']:.2f}"
                      + (f", other processes {100 * r['other_load']:.0f}% of the CPUs" if r["other_load"] is not None
                         else "")
                      + (" (disturbed: redone)" if disturbed and attempt < args.retries else "")
                      + (" (disturbed)" if disturbed and attempt == args.retries else ""), flush=True)
                if not disturbed or attempt == args.retries:
                    runs[name].append(r)
                    break

    ours_steps = [s for r in runs["ours"] for s in r["steps"]]
    flops_per_sample = statistics.median(s["flops_per_sample"] for s in ours_steps)
    peaks = [s["peak"] for s in ours_steps if s["peak"]]
    peak = args.peak_flops or (statistics.median(peaks) if peaks else None)
    res = summarize(args, runs, flops_per_sample, peak)
    meta = {"device": device, "peak_flops": peak}
    print_table(args, res, meta)

    report = {
        "benchmark": "benchmarks/clip_step.py",
        "what": "end-to-end CLIP training throughput (loading included) of `polymodal pretrain` (objective clip, "
                "DeepSpeed ZeRO 0) vs open_clip_train.main, same model, data, batch, precision, workers and threads",
        "goal": f"ours/open_clip samples/s >= {GPU_GOAL} on a GPU",
        "settings": {k: getattr(args, k) for k in ("model", "image_size", "batch_size", "precision", "workers",
                                                   "threads", "data", "steps", "warmup", "rounds", "run_steps",
                                                   "seed", "quick", "max_other_load", "retries")},
        "shards": shards,
        "hyperparameters": {"lr": LR, "weight_decay": WD, "warmup_steps": WARMUP_LR_STEPS, "grad_clip": GRAD_CLIP,
                            "crop_scale": list(SCALE), "hflip": 0.0, "betas": [0.9, 0.98], "eps": 1e-6},
        "commands": {"ours": ours_command(args, shards, work / "ours-TAG"),
                     "open_clip": peer_command(args, shards, work / "open_clip-TAG")},
        "peer_webdataset": {"folder": args.peer_webdataset, "version": wds_version},
        "parameters_m": runs["ours"][0].get("params_m"),
        "flops_per_sample": flops_per_sample,
        "peak_flops": peak,
        "device": device,
        "machine": machine_info("torch", "open_clip", optional=("deepspeed",), device="cuda" if args.gpu else "cpu"),
        "results": res,
        "runs": runs,
    }
    return finish(args.out, report, t_start, f"logs and run folders in {work}")


if __name__ == "__main__":
    sys.exit(main())
