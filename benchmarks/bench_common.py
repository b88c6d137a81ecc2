"""Helpers the benchmark scripts share: the machine's description, how busy it is (and how much of that is other
processes), timing a run, writing the JSON result."""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def system_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine so far (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def write_report(path: str | Path, report: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


def machine_basics() -> dict:
    """CPU and platform facts every benchmark result records; each script adds its library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model() or platform.processor(),
            "platform": platform.platform(), "python": platform.python_version()}


def wait_quiet(limit: float, max_wait: float, interval: float = 1.0) -> float:
    """Wait (up to max_wait s) until other processes use at most `limit` of the machine's CPUs; returns the
    seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        busy0 = system_busy_seconds()
        if busy0 is None:
            break
        time.sleep(interval)
        if (system_busy_seconds() - busy0) / (interval * (os.cpu_count() or 1)) <= limit:
            break
    return time.perf_counter() - t0


def loadavg() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def own_cpu_seconds(self_too: bool = True, children: bool = True) -> float:
    """CPU seconds used so far by this process (self_too) and by its children (children). A child counts only once
    it has been waited for, with its own reaped descendants: join data-loader workers and subprocesses first."""
    t = os.times()
    return (t.user + t.system if self_too else 0.0) + (t.children_user + t.children_system if children else 0.0)


class OtherLoad:
    """The share of the machine's CPUs that other processes take from now until share(): the machine's busy time
    less our own CPU seconds (own_cpu_seconds with the same arguments), over the elapsed time times the CPUs."""

    def __init__(self, self_too: bool = True, children: bool = True):
        self.own = {"self_too": self_too, "children": children}
        self.busy0, self.own0 = system_busy_seconds(), own_cpu_seconds(**self.own)
        self.t0 = time.perf_counter()

    def share(self, seconds: float | None = None) -> float | None:
        """None where /proc/stat is missing; `seconds` defaults to the time since this meter was made."""
        seconds = time.perf_counter() - self.t0 if seconds is None else seconds
        busy = system_busy_seconds()
        if busy is None or self.busy0 is None or seconds <= 0:
            return None
        ours = own_cpu_seconds(**self.own) - self.own0
        return max(0.0, (busy - self.busy0) - ours) / (seconds * (os.cpu_count() or 1))


def timed(fn, max_other_load: float, max_wait: float):
    """(fn(), record) after waiting (up to max_wait s) for other processes to use at most max_other_load of the
    CPUs; the record holds fn's wall seconds, the share of the CPUs other processes took meanwhile, the load
    averages before and after, and whether that share was above max_other_load (`disturbed`)."""
    waited = wait_quiet(max_other_load, max_wait)
    load_before = loadavg()
    meter = OtherLoad()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    other = meter.share(seconds)
    return result, {"seconds": seconds, "other_load": other, "waited_s": waited, "load_avg_before": load_before,
                    "load_avg_after": loadavg(), "disturbed": other is not None and other > max_other_load}


# Result keys for modules whose import name is not the name people know them by.
VERSION_KEYS = {"PIL": "pillow", "sklearn": "scikit-learn"}


def machine_info(*modules: str, optional: tuple[str, ...] = (), device=None) -> dict:
    """machine_basics() plus the `__version__` of each module named (import names: "torch", "open_clip", "PIL"
    ...; those in `optional` only where they import) and, given a device, its name, with the GPU's name and CUDA
    version for a CUDA device."""
    info = machine_basics()
    for name in modules + tuple(optional):
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name in optional:
                continue
            raise
        info[VERSION_KEYS.get(name, name)] = getattr(module, "__version__", "?")
    if device is not None:
        import torch

        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
    return info


def finish(path: str | Path, report: dict, t_start: float, where: str = "") -> int:
    """Add the run's total seconds to the report, write it as JSON, say where; the script's exit status (0)."""
    report["total_seconds"] = time.perf_counter() - t_start
    out = write_report(path, report)
    print(f"\nwrote {out} ({report['total_seconds']:.0f}s in all{'; ' + where if where else ''})")
    return 0


def add_quiet_options(parser, disturbed: str | None = None, max_other_load: float = 0.15,
                      max_wait: float | None = 60.0, max_wait_default: str = "%(default)s") -> None:
    """--max-other-load and --max-wait, as wait_quiet and timed read them; `disturbed` says what becomes of a run
    during which other processes took more than --max-other-load ("redone", "marked" ...), if anything."""
    parser.add_argument("--max-other-load", type=float, default=max_other_load,
                        help=(f"a run during which other processes use more than this share of the CPUs is "
                              f"{disturbed}; " if disturbed else "")
                        + "each run first waits up to --max-wait s for other processes to use at most this share "
                          "of the CPUs (default: %(default)s)")
    parser.add_argument("--max-wait", type=float, default=max_wait,
                        help=f"seconds to wait for other processes to go quiet before each run (default: "
                             f"{max_wait_default})")


def cifar_train_shards(args, repo: Path) -> Path:
    """The first --limit CIFAR-10 training images as shards in --shards-dir/train (from --data-root), written once
    and reused while their stats.json exists."""
    import subprocess
    import sys

    out = Path(args.shards_dir)
    train = out / "train"
    if (train / "stats.json").exists() and any(train.glob("*.tar")):
        return train
    source = Path(args.data_root) / "cifar10" / "train.tar.gz"
    if not source.exists():
        sys.exit(f"{source} not found: pass --data-root (the folder holding cifar10/train.tar.gz)")
    command = [sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out), "--split", "train",
               "--limit", str(args.limit), "--overwrite", "-q"]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=repo)
    print(f"[shards] python {' '.join(command[1:])} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return train


def preload_batches(args, shard_dir: Path, count: int, device, crop_scale: tuple[float, float],
                    keys: tuple[str, ...] = ("rgb",)) -> list[dict]:
    """`count` full batches of rgb from our ShardLoader (RandomResizedCrop at `crop_scale` to --image-size, flip),
    moved to `device` and kept in memory, so loading is not timed; more epochs if one is too short."""
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader

    cfg = DataConfig(shards=[str(shard_dir)], modalities=["rgb"], batch_size=args.batch_size, num_workers=0,
                     image_size=args.image_size, crop_scale=list(crop_scale), seed=args.seed, drop_last=True)
    batches: list[dict] = []
    loader = ShardLoader(cfg)
    while len(batches) < count:
        for batch in loader:
            batches.append({k: batch[k].to(device) if hasattr(batch[k], "to") else list(batch[k]) for k in keys})
            if len(batches) == count:
                break
    return batches


def timed_training_steps(args, step, batches, device) -> dict:
    """One side's run of a step benchmark: wait for quiet (--max-other-load, --max-wait), then `step(i, batch)`
    (zero_grad, forward, backward, optimizer step; returns the loss tensor) over `batches`, each timed from
    zero_grad to the loss read back (with a device synchronize on CUDA). The first --warmup steps are left out of
    samples/s and the median step time."""
    import statistics
    import sys

    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if torch.get_num_threads() != args.threads:
        sys.exit(f"torch threads changed to {torch.get_num_threads()} (expected {args.threads})")
    waited = wait_quiet(args.max_other_load, args.max_wait)
    load, t_run = OtherLoad(children=False), time.perf_counter()
    times, losses = [], []
    for i, batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        value = step(i, batch).item()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(value)
    other = load.share(time.perf_counter() - t_run)
    timed = times[args.warmup:]
    return {"samples_per_s": args.batch_size * len(timed) / sum(timed),
            "ms_per_step": 1000 * statistics.median(timed), "step_s": times, "losses": losses,
            "other_load": other, "waited_s": waited}


def add_step_benchmark_options(parser, repo: Path, out: str) -> None:
    """The options the training-step benchmarks (spark_step, multimae_step) share: run shape, device, data."""
    import torch

    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: the CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(repo.parent / "shared" / "data"))
    parser.add_argument("--shards-dir", default="bench-out/cifar10-train2048",
                        help="CIFAR-10 training shards go to DIR/train, written once (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=2048, help="training images written to the shards")
    parser.add_argument("--loss-tolerance", type=float, default=1e-4,
                        help="relative difference of the check's first-step losses reported as a match")
    parser.add_argument("--out", default=out)
