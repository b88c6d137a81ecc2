"""Engine overhead: our training step (polymodal.pretrain.engine.Engine on DeepSpeed) vs a bare PyTorch loop.

Both run in one process, on the same model (built twice from the same seed: identical weights), the same
optimizer settings and the same batches, and are timed in interleaved blocks so that drift on a shared machine
hits both alike:

  ours  what `polymodal pretrain` does per step, less writing the JSON line: engine.lr(),
        engine.step(iter([batch])) (to_device, DeepSpeed forward/backward/step with ZeRO 0, GuardedAdamW,
        gradient clipping), engine.reduce([result], ...) (log.every=1: each step a sync point), engine.grad_norm(),
        and json.dumps of the record the loop writes (memory_gb included)
  bare  the same objective module (timm model + cross-entropy) with torch.optim.AdamW over the same param groups
        (polymodal.pretrain.optim.param_groups), LambdaLR with the same schedule, loss.backward(),
        torch.nn.utils.clip_grad_norm_, optimizer.step(), scheduler.step(), zero_grad(set_to_none=True); every
        batch moved to the device with the same to_device; loss.item() and the norm's .item() per step, and a
        json.dumps of {step, loss, lr, grad_norm} (what any loop logs)

Precision: fp32 on CPU. On a GPU the default is bf16: ours is DeepSpeed's bf16 (bf16 weights, fp32 master
weights in its BF16_Optimizer), bare is torch.autocast(bfloat16) over fp32 weights, the usual plain-PyTorch
recipe. Both count the same model FLOPs.

Data loading is not measured: --batches real CIFAR-10 test batches (ShardLoader, RandomResizedCrop + flip to
--image-size) are read into memory once, and both loops cycle through them in the same order. The loader has its
own benchmark (benchmarks/loader.py). The shards are built once into --shards (default bench-out/cifar10-shards)
from ../shared/data/cifar10/test.tar.gz.

Timing: --warmup steps of each loop first (their losses are compared: the first one must match, as both models
start from the same weights and see the same batch), then --repeats rounds of one block of --steps steps per
loop, in the order ours, bare, bare, ours, ours, bare ... (ABBA, so neither always goes first). Each step is
timed on its own (on a GPU after a device synchronize; both loops wait for the device each step anyway to read
their loss). Figures are medians over all timed steps; the spread over blocks is reported too. Both loops run
with the same number of torch threads (checked before every block).

Model FLOP/s = training_flops_per_sample (3x the forward FLOPs counted by torch) x batch size / step time; MFU
divides it by the device's peak (polymodal.pretrain.flops.device_peak_flops, known GPUs only; --peak-flops
otherwise). Goal: ours/bare step time <= 1.05.

    python benchmarks/engine_overhead.py            # full run (10 minutes on a busy 2-core machine)
    python benchmarks/engine_overhead.py --quick    # smoke run (under a minute after the shards exist)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from bench_common import finish, loadavg, machine_info  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GOAL = 1.05
LOOPS = ("ours", "bare")


# ---------------------------------------------------------------------------------------------------------------
# Data


def ensure_shards(args) -> Path:
    """CIFAR-10 test as shards in --shards, written once (reused while its stats.json exists)."""
    shard_dir = Path(args.shards)
    if (shard_dir / "stats.json").exists() and any(shard_dir.glob("*.tar")):
        return shard_dir
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    source = Path(args.data_root) / "cifar10" / "test.tar.gz"
    if not source.exists():
        sys.exit(f"{source} not found: pass --data-root (the folder holding cifar10/test.tar.gz) or --shards")
    t0 = time.perf_counter()
    stats = write_shards(open_source(str(source), SourceOptions(shuffle=True, seed=0)), shard_dir,
                         WriterOptions(samples_per_shard=1000, workers=2), overwrite=True, show_progress=False)
    print(f"[shards] wrote {stats['samples']} CIFAR-10 test samples to {shard_dir} in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return shard_dir


def read_batches(args, shard_dir: Path) -> list[dict]:
    """--batches full batches from ShardLoader, kept in memory (CPU tensors)."""
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader

    cfg = DataConfig(shards=[str(shard_dir)], modalities=["rgb", "label"], batch_size=args.batch_size,
                     num_workers=0, image_size=args.image_size, seed=0, drop_last=True)
    batches: list[dict] = []
    while len(batches) < args.batches:  # more epochs if one is too short
        for batch in ShardLoader(cfg):
            batches.append(batch)
            if len(batches) == args.batches:
                break
    return batches


# ---------------------------------------------------------------------------------------------------------------
# The two loops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """Engine.step + everything the loop does per step except writing the line (see polymodal/pretrain/loop.py)."""

    def __init__(self, cfg, objective, world, flops_per_sample: float, peak: float | None):
        from polymodal.pretrain.engine import Engine

        self.engine = Engine(cfg, objective, world)
        self.world, self.flops_per_sample, self.peak = world, flops_per_sample, peak
        self.n = 0
        self.losses: list[float] = []

    def step(self, batch: dict) -> float:
        from polymodal.pretrain.runlog import memory_gb

        engine = self.engine
        began = time.perf_counter()
        lr = engine.lr()
        result = engine.step(iter([batch]))
        # log.every=1 (the default): every step is a sync point, reduced over ranks on its own
        (reduced,), _stop = engine.reduce([result], False)
        self.n += 1
        seconds = time.perf_counter() - began
        flops = self.flops_per_sample * reduced.samples / seconds / self.world.world_size
        json.dumps({
            "step": self.n, "time": time.time(), "epoch": 0, **reduced.metrics, "lr": lr,
            "grad_norm": None if reduced.bad else engine.grad_norm(),
            "samples_per_s": reduced.samples / seconds,
            "tokens_per_s": reduced.tokens / seconds if reduced.tokens else None,
            "data_wait": min(1.0, reduced.data_wait / seconds), "flops_per_s": flops,
            "mfu": flops / self.peak if self.peak else None, "mem_gb": memory_gb(self.world.device),
            "skipped_steps": 0, "samples": 0})
        self.losses.append(reduced.metrics["loss"])
        return reduced.metrics["loss"]


class Bare:
    """The plain PyTorch loop on the same objective module."""

    def __init__(self, cfg, objective, device: torch.device, precision: str):
        from polymodal.pretrain.optim import lr_factor, param_groups

        self.model = objective.to(device).train()
        self.device = device
        o = cfg.optim
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay, o.lr), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: lr_factor(step, o, cfg.steps))
        self.grad_clip = cfg.grad_clip
        self.autocast = precision == "bf16"
        self.n = 0
        self.losses: list[float] = []

    def step(self, batch: dict) -> float:
        from polymodal.pretrain.engine import to_device

        batch = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch)
        loss = out["loss"]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else None
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.n += 1
        value = loss.item()
        json.dumps({"step": self.n, "loss": value, "lr": lr, "grad_norm": None if norm is None else norm.item()})
        self.losses.append(value)
        return value


# ---------------------------------------------------------------------------------------------------------------
# Report


def summarize(times: dict[str, list[list[float]]], batch_size: int, flops_per_sample: float,
              peak: float | None) -> dict:
    out = {}
    for name, blocks in times.items():
        steps = [t for block in blocks for t in block]
        med = statistics.median(steps)
        block_medians = [statistics.median(b) for b in blocks]
        flops = flops_per_sample * batch_size / med
        out[name] = {"step_s_median": med, "step_s_mean": statistics.fmean(steps), "step_s_min": min(steps),
                     "block_medians_s": block_medians, "samples_per_s": batch_size / med, "flops_per_s": flops,
                     "mfu": flops / peak if peak else None, "steps_timed": len(steps)}
    ours, bare = times["ours"], times["bare"]
    # Ratio per round (the two blocks of a round ran back to back), to show the spread of the ratio itself.
    per_round = [statistics.median(o) / statistics.median(b) for o, b in zip(ours, bare)]
    ratio = out["ours"]["step_s_median"] / out["bare"]["step_s_median"]
    return {"loops": out, "ratio": ratio, "ratio_per_round": per_round,
            "ratio_spread": [min(per_round), max(per_round)], "goal_met": ratio <= GOAL}


def print_table(res: dict, args, meta: dict) -> None:
    loops = res["loops"]
    peak = meta["peak_flops"]
    print(f"\n{args.model} at {args.image_size} px, batch {args.batch_size}, {meta['precision']} on "
          f"{meta['device']}, {meta['torch_threads']} torch threads; {args.repeats} rounds x {args.steps} steps per "
          f"loop after {args.warmup} warm-up steps; medians of per-step times. Data loading not measured (batches "
          f"held in memory).")
    header = (f"{'loop':6s}{'step ms':>10s}{'[block medians min-max]':>26s}{'samples/s':>11s}"
              f"{'model TFLOP/s':>15s}" + (f"{'MFU':>8s}" if peak else ""))
    print(header)
    print("-" * len(header))
    for name in LOOPS:
        r = loops[name]
        bm = r["block_medians_s"]
        print(f"{name:6s}{1e3 * r['step_s_median']:10.1f}{f'[{1e3 * min(bm):.1f}-{1e3 * max(bm):.1f}]':>26s}"
              f"{r['samples_per_s']:11.1f}{r['flops_per_s'] / 1e12:15.4f}"
              + (f"{100 * r['mfu']:7.1f}%" if peak else ""))
    lo, hi = res["ratio_spread"]
    print(f"\nours/bare step time: {res['ratio']:.3f} (per round {lo:.3f}-{hi:.3f}); goal <= {GOAL}: "
          f"{'met' if res['goal_met'] else 'NOT met'}")
    if not peak:
        print("MFU: no peak FLOP/s known for this device (pass --peak-flops)")


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=None,
                        help="distinct batches held in memory (default: 40, quick: 8)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default: 10, quick: 5)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of one block per loop (default: 6, quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per loop first (default: 3, quick: 2)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 on CPU, bf16 on a GPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both loops (default: torch's default)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of the device for MFU (default: looked up for known GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar10/test.tar.gz (default: %(default)s)")
    parser.add_argument("--shards", default="bench-out/cifar10-shards",
                        help="CIFAR-10 test shards; written there if missing (default: %(default)s)")
    parser.add_argument("--out", default="bench-out/engine_overhead.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke run (noisy)")
    args = parser.parse_args(argv)
    args.batches = args.batches or (8 if args.quick else 40)
    args.steps = args.steps or (5 if args.quick else 10)
    args.repeats = args.repeats or (2 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    from polymodal.pretrain.distributed import init_distributed, shutdown  # before deepspeed is imported

    world = init_distributed()
    try:
        import deepspeed.utils.logging as ds_logging

        ds_logging.logger.setLevel(logging.WARNING)
        return run(args, world, t_start)
    finally:
        shutdown()


def run(args, world, t_start: float) -> int:
    from polymodal.pretrain.config import load_pretrain_config
    from polymodal.pretrain.flops import device_peak_flops, training_flops_per_sample
    from polymodal.pretrain.objectives import build_objective

    device = world.device
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    shard_dir = ensure_shards(args)
    t0 = time.perf_counter()
    batches = read_batches(args, shard_dir)
    print(f"[data] {len(batches)} batches of {args.batch_size} ({args.image_size} px) read into memory in "
          f"{time.perf_counter() - t0:.1f}s; data loading is not part of the timings", flush=True)

    total_steps = (args.warmup + args.steps * args.repeats) + 1
    cfg = load_pretrain_config(None, [
        f"data.shards={shard_dir}", f"data.batch_size={args.batch_size}", f"data.image_size={args.image_size}",
        "data.modalities=[rgb,label]", f"objective.model={args.model}", f"steps={total_steps}",
        f"precision={precision}", "zero_stage=0", f"seed={args.seed}", "run_dir=bench-out/engine-overhead-run"])

    torch.manual_seed(args.seed)
    bare_objective = build_objective(cfg.objective)
    torch.manual_seed(args.seed)
    ours_objective = build_objective(cfg.objective)
    same_init = all(torch.equal(a, b) for a, b in zip(ours_objective.state_dict().values(),
                                                        bare_objective.state_dict().values()))
    flops_per_sample = training_flops_per_sample(bare_objective, batches[0])
    peak = args.peak_flops or cfg.peak_flops or device_peak_flops(device, precision)

    ours = Ours(cfg, ours_objective, world, flops_per_sample, peak)
    bare = Bare(cfg, bare_objective, device, precision)
    if torch.get_num_threads() != threads:  # in case building the engine changed it
        print(f"note: torch threads changed from {threads} to {torch.get_num_threads()} while building; reset",
              flush=True)
        torch.set_num_threads(threads)
    loops = {"ours": ours, "bare": bare}
    position = {"ours": 0, "bare": 0}  # each loop walks through the batches in the same order

    def block(name: str, steps: int) -> list[float]:
        if torch.get_num_threads() != threads:
            raise RuntimeError(f"torch threads changed to {torch.get_num_threads()} (expected {threads})")
        loop, times = loops[name], []
        sync(device)
        for _ in range(steps):
            batch = batches[position[name] % len(batches)]
            position[name] += 1
            began = time.perf_counter()
            loop.step(batch)
            sync(device)
            times.append(time.perf_counter() - began)
        return times

    for name in LOOPS:
        block(name, args.warmup)
    first = {name: loops[name].losses[0] for name in LOOPS}
    print(f"[warm-up] {args.warmup} steps each; losses ours {['%.4f' % v for v in ours.losses]} bare "
          f"{['%.4f' % v for v in bare.losses]} (same initial weights: {same_init})", flush=True)

    times: dict[str, list[list[float]]] = {name: [] for name in LOOPS}
    loads = []
    for rnd in range(args.repeats):
        order = LOOPS if rnd % 2 == 0 else LOOPS[::-1]
        line = []
        for name in order:
            t = block(name, args.steps)
            times[name].append(t)
            line.append(f"{name} {1e3 * statistics.median(t):7.1f} ms")
        loads.append(loadavg())
        print(f"[round {rnd + 1}/{args.repeats}] " + "  ".join(line)
              + (f"  load avg {loads[-1]:.2f}" if loads[-1] is not None else ""), flush=True)

    res = summarize(times, args.batch_size, flops_per_sample, peak)
    meta = {"precision": precision, "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                            if device.type == "cuda" else ""),
            "torch_threads": threads, "peak_flops": peak}
    print_table(res, args, meta)

    report = {
        "benchmark": "benchmarks/engine_overhead.py",
        "what": "step time of polymodal's Engine (DeepSpeed) vs a bare PyTorch loop on the same model, batches and "
                "optimizer settings; data loading not measured (batches held in memory)",
        "goal": f"ours/bare step time <= {GOAL}",
        "settings": {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
                     "batches": args.batches, "steps_per_block": args.steps, "repeats": args.repeats,
                     "warmup": args.warmup, "precision": precision, "zero_stage": 0, "torch_threads": threads,
                     "seed": args.seed, "quick": args.quick, "grad_clip": cfg.grad_clip,
                     "optim": {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
                               "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                               "schedule": cfg.optim.schedule},
                     "bare_bf16": "torch.autocast(bfloat16), fp32 weights" if precision == "bf16" else None},
        "flops_per_sample": flops_per_sample,
        "peak_flops": peak,
        "parameters": sum(p.numel() for p in bare_objective.parameters()),
        "same_initial_weights": same_init,
        "first_loss": first,
        "losses": {"ours": ours.losses, "bare": bare.losses},
        "load_avg_per_round": loads,
        "machine": {**machine_info("torch", "deepspeed", "timm", device=device), "torch_threads": threads},
        "results": res,
        "step_times_s": times,
    }
    return finish(args.out, report, t_start)


if __name__ == "__main__":
    sys.exit(main())
