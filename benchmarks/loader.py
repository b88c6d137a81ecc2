"""Loader throughput: polymodal's ShardLoader vs an open_clip-style webdataset pipeline vs raw JPEG decoding.

One process builds WebDataset shards with polymodal's writer, then measures, in interleaved rounds, on the
same shards and with the same number of worker processes N:

  ours        polymodal.data.pipeline.ShardLoader, RandomResizedCrop(224, scale=SCALE) + hflip, batches of
              uint8 [B,3,224,224] (normalisation is meant to happen on the accelerator)
  ours+float  the same, plus the main process converting every batch to normalised float32
              ((x.float()/255 - mean)/std, CLIP mean/std): the peer's output, for an honest comparison
  open_clip   the pipeline of open_clip_train.data.get_wds_dataset: wds.DataPipeline(SimpleShardList,
              detshuffle, split_by_node, split_by_worker, tarfile_to_samples, shuffle, select, decode("pilrgb"),
              rename, map_dict(preprocess), to_tuple, batched) in a torch DataLoader(batch_size=None,
              num_workers=N); preprocess = open_clip's train transform (torchvision RandomResizedCrop(224,
              scale=SCALE, BICUBIC), convert RGB, ToTensor, Normalize) -> float32 batches
  raw decode  a multiprocessing Pool(N) over the shard files (each --raw-repeats times, as it is quick), each
              read with tarfile and every image fully decoded with PIL (Image.open(BytesIO(bytes)); .load();
              .convert("RGB") only if not RGB already): the ceiling of a PIL-decoding loader, with no crop,
              resize, tensor or batching

Both pipelines use the same crop scale (SCALE = 0.08-1.0, torchvision's RandomResizedCrop default; open_clip's
own default is 0.9-1.0, which is cheaper for ours since big crops let JPEGs be decoded at reduced size), the
same shuffle buffer, batch size and N. Ours also flips half the images (open_clip's train transform does not).

Figures are images per second per worker process (images / wall time / N). "Steady state" leaves out each
worker's first batch (timed from the arrival of the N-th batch to the last one); "end to end" times everything
from creating the loader, worker start included. Every measurement runs --rounds times, interleaved; the table
shows the best round and the median, ratios use the bests. The machine may be shared: each measurement first
waits for other processes to go quiet, records how much CPU they used meanwhile, and runs where they used more
than --max-other-load are left out. Goals printed beside the ratios: ours >= 1.5x open_clip-style, ours >= 0.8x
raw decode.

Datasets, under --data-root (default: ../shared/data relative to the repository root), written into shards
with polymodal's writer: imagenet-samples (1000 real JPEG photos, median 500x375, each written
--imagenet-copies times for a longer epoch, 125 per shard) and the CIFAR-10 test set (10,000 32x32 JPEGs,
1000 per shard, upscaled to 224 by both pipelines).

    python benchmarks/loader.py                      # full run (about 3 minutes on 2 quiet cores)
    python benchmarks/loader.py --quick              # smaller, 1 round (under a minute)
    python benchmarks/loader.py --work-dir /tmp/lb   # keep and reuse the shards between runs
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from bench_common import OtherLoad, add_quiet_options, finish, machine_info, wait_quiet  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
METHODS = ("ours", "ours+float", "open_clip", "raw")
GOALS = {"ours/open_clip": 1.5, "ours/raw": 0.8}


# ---------------------------------------------------------------------------------------------------------------
# Shards


def build_shards(args, work: Path) -> dict[str, dict]:
    """Write (or reuse) the shards of each dataset; returns name -> {dir, samples, shards}."""
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    data_root = Path(args.data_root)
    cifar_limit = 4000 if args.quick else None
    specs = {
        "imagenet": dict(samples_per_shard=125, limit=None, copies=args.imagenet_copies),
        "cifar10": dict(samples_per_shard=500 if args.quick else 1000, limit=cifar_limit, copies=1),
    }
    out = {}
    for name in args.datasets:
        spec = specs[name]
        shard_dir = work / name
        stats_path = shard_dir / "stats.json"
        want = dict(spec)
        marker = shard_dir / "_bench.json"
        if not args.rebuild and stats_path.exists() and marker.exists() and json.loads(marker.read_text()) == want:
            stats = json.loads(stats_path.read_text())
            print(f"[shards] reusing {shard_dir} ({stats['samples']} samples)", flush=True)
        else:
            if name == "imagenet":
                source_path = imagenet_table(data_root / "imagenet-samples", work, spec["copies"])
                opts = SourceOptions(caption="{gloss}", shuffle=True, seed=0, limit=spec["limit"])
            else:
                source_path = str(data_root / "cifar10" / "test.tar.gz")
                opts = SourceOptions(shuffle=True, seed=0, limit=spec["limit"])
            t0 = time.perf_counter()
            stats = write_shards(open_source(source_path, opts), shard_dir,
                                 WriterOptions(samples_per_shard=spec["samples_per_shard"], workers=args.workers),
                                 overwrite=True, show_progress=False)
            marker.write_text(json.dumps(want))
            print(f"[shards] {name}: {stats['samples']} samples, {len(shard_files(shard_dir))} shards, "
                  f"failures {stats['failures'] or 0}, {time.perf_counter() - t0:.1f}s", flush=True)
        if not stats["samples"]:
            sys.exit(f"no samples written for {name}: {stats.get('failures')}")
        out[name] = {"dir": str(shard_dir), "samples": stats["samples"], "shards": len(shard_files(shard_dir)),
                     "bytes": stats.get("bytes")}
    return out


def imagenet_table(folder: Path, work: Path, copies: int) -> str:
    """captions_wordnet.jsonl with every row `copies` times (a longer epoch), absolute image paths, and only
    `image` + `gloss` (the caption; labels are not needed here)."""
    src = folder / "captions_wordnet.jsonl"
    if not src.exists():
        sys.exit(f"{src} not found: pass --data-root (the folder holding imagenet-samples/ and cifar10/)")
    dst = work / "imagenet-samples.jsonl"
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for line in f:
            if line.strip():
                row = json.loads(line)
                g.write((json.dumps({"image": str((folder / row["image"]).resolve()), "gloss": row["gloss"]}) + "\n")
                        * copies)
    return str(dst)


def shard_files(shard_dir: Path | str) -> list[str]:
    from polymodal.data.shardlist import natural_key

    names = [p for p in os.listdir(shard_dir) if p.endswith((".tar", ".tar.gz"))]
    return [os.path.join(shard_dir, p) for p in sorted(names, key=natural_key)]


# ---------------------------------------------------------------------------------------------------------------
# The measured pipelines. Each returns a Clock: when each batch (raw: each shard) arrived, and its image count.




class Clock:
    """Batch arrival times, and how busy the rest of the machine was meanwhile (other processes' load)."""

    def __init__(self):
        self.load = OtherLoad()  # children count once reaped: DataLoader workers and the Pool join before result()
        self.t0 = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []

    def tick(self, images: int) -> None:
        self.arrivals.append((time.perf_counter() - self.t0, images))

    def result(self, workers: int) -> dict:
        """end to end: all images / all the time. steady: without each worker's first batch (warm-up): images
        after the first `workers` arrivals, over the time from the last of those to the end."""
        end = time.perf_counter() - self.t0
        images = sum(n for _, n in self.arrivals)
        if not self.arrivals:
            raise RuntimeError("the loader produced no batch")
        k = min(workers, len(self.arrivals) - 1)
        t_warm = self.arrivals[k - 1][0] if k > 0 else 0.0
        steady_images = sum(n for _, n in self.arrivals[k:])
        other = self.load.share(end)  # CPU used by processes other than this benchmark, as a share of the machine's
        return {"images": images, "seconds": end, "first_batch_s": self.arrivals[0][0], "warmup_s": t_warm,
                "steady_images": steady_images, "steady_seconds": end - t_warm, "other_load": other}


def run_ours(args, shard_dir: str, to_float: bool) -> Clock:
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader

    cfg = DataConfig(shards=[shard_dir], modalities=["rgb"], batch_size=args.batch_size, num_workers=args.workers,
                     image_size=224, augment=True, crop_scale=list(args.scale), shuffle_buffer=args.shuffle_buffer,
                     shuffle_initial=args.shuffle_initial, seed=0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    clock = Clock()
    for batch in ShardLoader(cfg):  # one epoch
        x = batch["rgb"]
        if not clock.arrivals:
            assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 224, 224), (x.dtype, x.shape)
        if to_float:  # (x/255 - mean)/std, with the 255 folded into mean and std
            x = x.float().sub_(mean).div_(std)
        clock.tick(x.shape[0])
    return clock


def _has_image(sample: dict) -> bool:
    return any(ext in sample for ext in IMAGE_EXTS)


def openclip_preprocess(scale: tuple[float, float]):
    """open_clip's own train transform (RandomResizedCrop BICUBIC, RGB, ToTensor, Normalize), or its twin."""
    try:
        from open_clip.transform import image_transform

        return image_transform(224, is_train=True, mean=CLIP_MEAN, std=CLIP_STD, aug_cfg={"scale": tuple(scale)}), \
            "open_clip.transform.image_transform(224, is_train=True, aug_cfg={'scale': SCALE})"
    except ImportError:
        from torchvision import transforms as T

        return T.Compose([T.RandomResizedCrop(224, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
                          lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]), \
            "torchvision RandomResizedCrop+ToTensor+Normalize (open_clip not installed)"


def run_openclip(args, shard_dir: str) -> Clock:
    import webdataset as wds

    preprocess, _ = openclip_preprocess(args.scale)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_files(shard_dir)),
        wds.detshuffle(bufsize=2000, initial=500, seed=0, epoch=0),  # open_clip: detshuffle2, the same idea
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=args.shuffle_buffer, initial=args.shuffle_initial),
        wds.select(_has_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp"),
        wds.map_dict(image=preprocess),
        wds.to_tuple("image"),
        wds.batched(args.batch_size, partial=True),
    )
    clock = Clock()
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers)
    for (x,) in loader:
        if not clock.arrivals:
            assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 224, 224), (x.dtype, x.shape)
        clock.tick(x.shape[0])
    return clock


def decode_shard(path: str) -> int:
    """Fully decode every image of one shard; returns how many."""
    n = 0
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if info.isfile() and info.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                img = Image.open(BytesIO(tar.extractfile(info).read()))
                img.load()
                if img.mode != "RGB":
                    img = img.convert("RGB")
                n += 1
    return n


def run_raw(args, shard_dir: str) -> Clock:
    clock = Clock()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for n in pool.imap_unordered(decode_shard, shard_files(shard_dir) * args.raw_repeats, chunksize=1):
            clock.tick(n)
    return clock


# ---------------------------------------------------------------------------------------------------------------
# Report


def describe_machine() -> dict:
    from PIL import features

    return {**machine_info("torch", "torchvision", "PIL", "webdataset", "numpy"),
            "torch_threads_main": torch.get_num_threads(),
            "libjpeg_turbo": features.version("jpg") if features.check_feature("libjpeg_turbo") else None}


def summarize(runs: list[dict], workers: int, max_other: float) -> dict:
    quiet = [r for r in runs if r["other_load"] is None or r["other_load"] <= max_other]
    contended = not quiet
    runs = quiet or runs
    steady = [r["steady_images"] / r["steady_seconds"] / workers for r in runs]
    e2e = [r["images"] / r["seconds"] / workers for r in runs]
    return {"steady_median": statistics.median(steady), "steady_best": max(steady), "steady_all": steady,
            "e2e_median": statistics.median(e2e), "e2e_best": max(e2e), "e2e_all": e2e, "images": runs[0]["images"],
            "first_batch_s_median": statistics.median(r["first_batch_s"] for r in runs),
            "runs_used": len(runs), "all_runs_contended": contended}


def ratios_of(methods: dict, kind: str) -> dict:
    med = {m: v[f"{kind}_best"] for m, v in methods.items()}
    pairs = [("ours", "open_clip"), ("ours", "raw"), ("ours+float", "open_clip"), ("ours+float", "raw")]
    return {f"{a}/{b}": med[a] / med[b] for a, b in pairs if a in med and b in med}


def print_table(results: dict, args) -> None:
    for kind, title in (("steady", "steady state: each worker's first batch (warm-up) excluded"),
                        ("e2e", "end to end: worker start and first batches included")):
        print(f"\nimages/s per worker process, {title}; N={args.workers}, batch {args.batch_size}, crop scale "
              f"{args.scale[0]}-{args.scale[1]}; best of {args.rounds} round(s) [median]; ratios of the bests")
        header = f"{'dataset':9s}" + "".join(f"{m:>15s}" for m in METHODS) + \
            "".join(f"{k:>16s}" for k in ("ours/open_clip", "ours/raw", "float/open_clip"))
        print(header)
        print("-" * len(header))
        for name, res in results.items():
            m = res["methods"]
            cells = "".join(f"{m[k][kind + '_best']:8.0f} [{m[k][kind + '_median']:4.0f}]" for k in METHODS)
            r = res["ratios"][kind]
            print(f"{name:9s}{cells}{r['ours/open_clip']:15.2f}x{r['ours/raw']:15.2f}x"
                  f"{r['ours+float/open_clip']:15.2f}x")
    print()
    for name, res in results.items():
        r = res["ratios"]["steady"]
        verdict = ", ".join(f"{k} {r[k]:.2f}x (goal >= {g}x: {'met' if r[k] >= g else 'NOT met'})"
                            for k, g in GOALS.items())
        print(f"{name} (steady state): {verdict}")
        noisy = [m for m, v in res["methods"].items() if v["all_runs_contended"]]
        if noisy:
            print(f"  warning: every {name} run of {', '.join(noisy)} had other processes using more than "
                  f"{args.max_other_load:.0%} of the CPUs; those figures are low")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding imagenet-samples/ and cifar10/test.tar.gz (default: %(default)s)")
    parser.add_argument("--work-dir", default=None,
                        help="where shards are written, and reused by later runs (default: a temp dir, removed)")
    parser.add_argument("--rebuild", action="store_true", help="rewrite the shards even if --work-dir has them")
    parser.add_argument("--out", default="bench-out/loader.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes N for every method (default: 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default: 3, quick: 1)")
    parser.add_argument("--imagenet-copies", type=int, default=None,
                        help="each photo is written this many times, for a longer epoch (default: 3, quick: 1)")
    parser.add_argument("--raw-repeats", type=int, default=3,
                        help="the raw decode reads every shard this many times: a longer, steadier measurement "
                             "(default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="samples, both pipelines (default: 1000)")
    parser.add_argument("--shuffle-initial", type=int, default=100, help="both pipelines (default: 100)")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                        help="RandomResizedCrop area scale, both pipelines (default: 0.08 1.0)")
    parser.add_argument("--datasets", nargs="+", choices=["imagenet", "cifar10"], default=["imagenet", "cifar10"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="subset to run (the table needs all four)")
    add_quiet_options(parser, "redone (--retries), then left out of the figures (unless all are)", 0.10, 30.0)
    parser.add_argument("--retries", type=int, default=2,
                        help="extra tries of a run disturbed by other processes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 1000 imagenet and 4000 CIFAR images: a smoke run (noisier)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.imagenet_copies = args.imagenet_copies or (1 if args.quick else 3)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="polymodal-bench-")
        work = Path(tmp)
    try:
        t_start = time.perf_counter()
        datasets = build_shards(args, work)
        runners = {
            "ours": lambda d: run_ours(args, d, to_float=False),
            "ours+float": lambda d: run_ours(args, d, to_float=True),
            "open_clip": lambda d: run_openclip(args, d),
            "raw": lambda d: run_raw(args, d),
        }
        runs: dict[str, dict[str, list]] = {n: {m: [] for m in args.methods} for n in datasets}
        for rnd in range(args.rounds):
            for name, info in datasets.items():
                expected = {m: info["samples"] * (args.raw_repeats if m == "raw" else 1) for m in METHODS}
                for method in args.methods:
                    for attempt in range(1 + args.retries):  # a run disturbed by other processes is redone
                        waited = wait_quiet(args.max_other_load, args.max_wait, interval=0.5)
                        r = runners[method](info["dir"]).result(args.workers)
                        r["waited_s"], r["attempt"] = waited, attempt + 1
                        runs[name][method].append(r)
                        contended = r["other_load"] is not None and r["other_load"] > args.max_other_load
                        print(f"[round {rnd + 1}/{args.rounds}] {name:9s} {method:11s} {r['images']:6d} images "
                              f"{r['seconds']:6.2f}s  steady "
                              f"{r['steady_images'] / r['steady_seconds'] / args.workers:5.0f}  end-to-end "
                              f"{r['images'] / r['seconds'] / args.workers:5.0f} img/s/core  first batch "
                              f"{r['first_batch_s']:4.2f}s"
                              + (f"  other load {r['other_load']:.0%}" if r["other_load"] is not None else "")
                              + ("  (contended: redone)" if contended and attempt < args.retries else "")
                              + ("" if r["images"] == expected[method] else f"  (expected {expected[method]} images!)"),
                              flush=True)
                        if not contended:
                            break

        results = {}
        for name, info in datasets.items():
            methods = {m: summarize(runs[name][m], args.workers, args.max_other_load) for m in args.methods}
            results[name] = {**info, "methods": methods,
                             "ratios": {"steady": ratios_of(methods, "steady"), "e2e": ratios_of(methods, "e2e")},
                             "runs": runs[name]}
        if all(m in args.methods for m in METHODS):
            print_table(results, args)

        report = {
            "benchmark": "benchmarks/loader.py",
            "unit": "images per second per worker process (images / wall seconds / workers); ratios of the best rounds",
            "timing": {"steady": "from the arrival of the N-th batch (each worker's first, N = workers; raw: the "
                                 "N-th shard) to the end, images after it",
                       "e2e": "from creating the loader (worker start included) to the last batch, all images"},
            "goals": {k: f">= {v}x" for k, v in GOALS.items()},
            "settings": {"workers": args.workers, "batch_size": args.batch_size, "rounds": args.rounds,
                         "crop_scale": list(args.scale), "image_size": 224, "shuffle_buffer": args.shuffle_buffer,
                         "shuffle_initial": args.shuffle_initial, "imagenet_copies": args.imagenet_copies,
                         "raw_repeats": args.raw_repeats,
                         "quick": args.quick, "open_clip_preprocess": openclip_preprocess(args.scale)[1]},
            "machine": describe_machine(),
            "results": results,
        }
        return finish(args.out, report, t_start)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
