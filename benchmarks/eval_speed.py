"""Evaluation speed: zero-shot classification and linear probe on CIFAR-10, ours against CLIP_benchmark / scikit-learn.

One process, one model object, timed in interleaved rounds (ours, peer, peer, ours, ...), each part run end to end
from the shard folder to the metrics, with the same batch size, data workers and threads on both sides:

  zero-shot      ours   polymodal.eval.tasks.zeroshot_classification(encoder, dataset, TaskOptions(batch_size=B,
                        num_workers=W, progress=False, cache_dir=None)) on resolve_dataset(DIR): class embeddings
                        (all prompts, batched), image features through our ShardLoader, then the metrics
                 peer   CLIP_benchmark 1.6.x as its CLI runs it: build_dataset("wds/cifar10", root=DIR,
                        transform, split="test") + torch DataLoader(ds.batched(B), batch_size=None, num_workers=W),
                        then clip_benchmark.metrics.zeroshot_classification.evaluate(model, loader, tokenizer,
                        classnames, templates, device="cpu", amp=False) (one text forward per class, then the
                        images through webdataset + PIL + open_clip's eval transform, then the metrics)
  features       ours   polymodal.eval.features.extract_features on the train and the test split (labels too)
                 peer   CLIP_benchmark's linear-probe featurizer loop (metrics/linear_probe.py: Featurizer =
                        F.normalize(model.encode_image(x)) over the same wds DataLoader as above), minus its
                        .cuda() (it asserts a GPU) and its on-disk feature cache
  probe fit      ours   polymodal.eval.linear_probe.linear_probe(train_x, train_y, test_x, test_y, seed=S): the
                        default C grid (1e-4 ... 1e4) from the smallest C up on a stratified 80/20 split of train,
                        stopping 2 C's past the best validation accuracy (as `polymodal eval` does by default),
                        refit on all of train with the best C, scored on test; multinomial L2 logistic regression
                        by L-BFGS in torch
  probe fit,     ours   the same with patience=None: every C of the grid, as scikit-learn below, so this ratio is
  every C               the solver's alone; the peer's time is the same scikit-learn run as in "probe fit"
                 peer   scikit-learn LogisticRegression(C=C, max_iter=1000) (lbfgs, tol 1e-4) for every C of the same
                        grid, on the same features, the same split (linear_probe.stratified_split, same seed) and the
                        same standardisation (train mean and population std; constant dimensions left alone); best
                        C = highest validation acc1 (ties: the smallest C, as ours), refit on all of train, test
                        scored with the same metric code. (CLIP_benchmark's own probe, AdamW over a weight-decay
                        search, asserts device == "cuda" and cannot run on a CPU, hence scikit-learn.)

Both sides run the very same open_clip model object: ours is built by polymodal.eval.encoders.load_encoder(--model)
after torch.manual_seed(--seed) (random init unless weights are given), and CLIP_benchmark gets
encoder.image_fn.owner (the open_clip model our Encoder wraps), open_clip's eval transform for it
(image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False), as create_model_and_transforms
builds it, which CLIP_benchmark's load_clip calls) and open_clip's tokenizer. Class names and prompt templates are
the dataset folder's classnames.txt and zeroshot_classification_templates.txt, read by both. By default no autocast
on either side (fp32; CLIP_benchmark with amp=False: its default amp=True would run bfloat16 on a CPU and change the
numbers). --device cuda runs both sides on the GPU (the peer's featurizer then also moves its batches there, as its
.cuda() does); --precision bf16|fp16 autocasts ours to that type and turns on CLIP_benchmark's amp (autocast's
default half type on the device: fp16 on CUDA).

CLIP_benchmark 1.6.2 crashes under numpy >= 2.4 in its `accuracy` (float() of a 1-element array); it is replaced
in-process by the same computation using .item() (clip_benchmark.metrics.zeroshot_classification.accuracy, which
evaluate() looks up at call time). Our tiny open_clip config polymodal-tiny-vit is registered with open_clip
in-process by importing polymodal.models.open_clip_towers.

Image preprocessing differs, as it does in use: ours decodes to uint8 tensors and resizes them with torch's
antialiased bicubic (then normalises the batch as float), CLIP_benchmark resizes PIL images with PIL's bicubic and
normalises per image. So the two zero-shot runs see slightly different pixels and their accuracies may differ a
little; the report prints the differences, and "equal accuracy" means acc1, acc5 and mean per-class recall no more
than 0.1 points (--tolerance) below the peer's (a faster side that is also more accurate counts as equal; the
signed differences are printed either way). The probe fits see identical features, so their accuracies differ
only through the optimisers' stopping points.

Data: CIFAR-10 from --data-root (default ../shared/data relative to the repository root: cifar10/test.tar.gz and
train.tar.gz, 32x32 JPEGs), written once with `polymodal data shards SOURCE DIR --split test|train [--limit N]`
into --shards-dir (CLIP_benchmark's wds layout: DIR/{test,train}/{0..n-1}.tar + nshards.txt, classnames.txt,
zeroshot_classification_templates.txt): the whole test set (10,000; --test-limit N takes a seeded random N) and a
seeded random --train-limit of the 50,000 training images for the probe (default 10,000; quick 2,000). Images are
upscaled to the model's size (64 px for polymodal-tiny-vit) by both sides. Shards hold 1,000 samples, fewer where
that would leave a data worker without a shard (CLIP_benchmark's loader fails then).

Model: --model is any polymodal eval spec (default open_clip:polymodal-tiny-vit: ViT 64 px, patch 8, 4+4 layers of
width 256, random init; no weights exist offline, so zero-shot accuracy is near chance, but both sides compute the
same numbers from the same weights and the speed comparison holds). --weights FILE loads an open_clip checkpoint
into that model (spec open_clip:NAME:FILE) for both sides. A model that is not an open_clip two-tower model gets
only the probe-fit comparison.

Threads: torch.set_num_threads(--threads) for both sides (data workers use one each, on both sides); scikit-learn's
BLAS and OpenMP pools are capped at the same number with threadpoolctl.threadpool_limits(--threads). On a shared
machine keep --threads at most the cores the other jobs leave free: with one of two cores taken, 2 threads made both
probe fits 20-80x slower than 1 thread (threads waiting on each other at every small step of L-BFGS), which swamps
the comparison; the script warns when other processes took more than a core's share and --threads > 1.

Timing: --rounds rounds (default 2, quick 1), each timing every part once per side, the order alternating between
rounds (ours, peer | peer, ours). Before each timed run the script waits (up to --max-wait s) for other processes
to use at most --max-other-load of the CPUs, and records the share they took during the run (runs above it are
marked, not redone). Figures are the median over rounds with the min-max; ratios are peer seconds / our seconds
(higher: ours faster). A small untimed forward pass warms the model up first. Goal (the issue's): ours at least 2x
faster than the peer at equal accuracy, for zero-shot and for the linear probe (fit on the same features). The
table also shows "probe end to end", each round's features + fit seconds per side (both fits ran on our features,
so its accuracies are the fit's). CLIP_benchmark draws its own tqdm bars on stderr (part of what it does). Compare
figures only from the same machine.

    python benchmarks/eval_speed.py            # full: 10,000 test + 10,000 train images, 2 rounds
    python benchmarks/eval_speed.py --quick    # smoke run: 2,000 test + 2,000 train images, 1 round
    python benchmarks/eval_speed.py --model open_clip:polymodal-tiny-vit --weights tiny.pt
    python benchmarks/eval_speed.py --device cuda --precision bf16      # on a GPU box
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench_common import add_quiet_options, finish, machine_info, timed  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL = 2.0  # peer seconds / our seconds, at equal accuracy (the goal)
SIDES = ("ours", "peer")
METRICS = ("acc1", "acc5", "mean_per_class_recall")


# ---------------------------------------------------------------------------------------------------------------
# Setup


def resolve_settings(args) -> None:
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.train_limit = args.train_limit or (2000 if args.quick else 10000)
    if args.test_limit is None and args.quick:
        args.test_limit = 2000
    if args.max_wait is None:
        args.max_wait = 10.0 if args.quick else 60.0
    if args.shards_dir is None:
        args.shards_dir = "bench-out/cifar10" + (f"-test{args.test_limit}" if args.test_limit else "")
    if args.weights:
        kind, _, rest = args.model.partition(":")
        if kind != "open_clip" or ":" in rest:
            sys.exit(f"--weights needs --model open_clip:NAME (got {args.model})")
        args.model = f"{args.model}:{args.weights}"


def _split_samples(folder: Path) -> int | None:
    import json

    try:
        return int(json.loads((folder / "stats.json").read_text())["samples"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_split(source: Path, out: Path, split: str, limit: int | None, workers: int) -> dict:
    """DIR/split written by `polymodal data shards` (kept when it is there with, given a limit, that many samples,
    and at least one shard per data worker: CLIP_benchmark's webdataset loader fails on a worker without a shard;
    rewritten otherwise)."""
    per_shard = min(1000, -(-(limit or 10000) // max(1, workers)))  # CIFAR-10 test: 10,000
    cmd = [sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out), "--split", split,
           "--samples-per-shard", str(per_shard), "-q"] + (["--limit", str(limit)] if limit is not None else [])
    have = _split_samples(out / split)
    try:
        shards = int((out / split / "nshards.txt").read_text())
    except (OSError, ValueError):
        shards = 0
    if have is not None and shards >= workers and (limit is None or have == limit):
        return {"split": split, "samples": have, "shards": shards, "command": ["python"] + cmd[1:],
                "written_s": None}
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data-root (the folder holding cifar10/)")
    t0 = time.perf_counter()
    subprocess.run(cmd + (["--overwrite"] if (out / split).exists() else []), check=True)
    seconds = time.perf_counter() - t0
    have, shards = _split_samples(out / split), int((out / split / "nshards.txt").read_text())
    print(f"[data] wrote {have} {split} samples in {shards} shards to {out / split} in {seconds:.1f}s", flush=True)
    return {"split": split, "samples": have, "shards": shards, "command": ["python"] + cmd[1:], "written_s": seconds}


def ensure_data(args) -> tuple[Path, list[dict]]:
    root, out = Path(args.data_root) / "cifar10", Path(args.shards_dir)
    written = [ensure_split(root / "test.tar.gz", out, "test", args.test_limit, args.workers),
               ensure_split(root / "train.tar.gz", out, "train", args.train_limit, args.workers)]
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (out / name).is_file():
            sys.exit(f"{out / name} missing: remove {out} and run again")
    return out, written


def patch_clip_benchmark() -> None:
    """CLIP_benchmark's accuracy with .item() instead of float() of a 1-element array (numpy >= 2.4 refuses it)."""
    import clip_benchmark.metrics.zeroshot_classification as zsc

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

    zsc.accuracy = accuracy


def build_models(args):
    """Our encoder and, for an open_clip two-tower model, what CLIP_benchmark gets: (model, transform, tokenizer)."""
    import torch

    import polymodal.models.open_clip_towers  # noqa: F401  (registers polymodal-tiny-vit with open_clip)
    from polymodal.eval.encoders import load_encoder

    torch.manual_seed(args.seed)
    encoder = load_encoder(args.model, args.image_size).to(args.device)
    owner = getattr(encoder.image_fn, "owner", None)
    if owner is None or not encoder.has_text or not hasattr(owner, "visual") or not hasattr(owner, "encode_text"):
        return encoder, None
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(owner.visual.preprocess_cfg)
    cfg["size"] = encoder.image_size
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    kind, _, rest = args.model.partition(":")
    name = rest.partition(":")[0] if kind == "open_clip" else None
    if name:
        tokenizer = open_clip.get_tokenizer(name)
    else:  # a polymodal checkpoint: our tokenizer (open_clip's, per text), batched as open_clip's is
        one = encoder.tokenizer()
        tokenizer = lambda texts: torch.stack([torch.as_tensor(one(t)) for t in texts])  # noqa: E731
    return encoder, (owner.to(args.device), transform, tokenizer)


def warm_up(encoder, peer) -> None:
    """One small untimed forward of each tower (first-call costs would otherwise land on whoever runs first)."""
    import torch

    with torch.no_grad():
        device = encoder.mean.device
        encoder.encode_image(torch.zeros(8, 3, encoder.image_size, encoder.image_size, dtype=torch.uint8,
                                         device=device))
        if encoder.has_text:
            tok = encoder.tokenizer()
            encoder.encode_text(torch.stack([torch.as_tensor(tok("a photo of a cat."))] * 8).to(device))
        if peer is not None:
            peer[0].encode_text(peer[2](["a photo of a cat."] * 8).to(device))


# ---------------------------------------------------------------------------------------------------------------
# The two sides


def ours_zeroshot(encoder, shards_dir: Path, args) -> dict:
    from polymodal.eval.datasets import resolve_dataset
    from polymodal.eval.tasks import TaskOptions, zeroshot_classification

    dataset = resolve_dataset(str(shards_dir), cache_dir=Path(args.work_dir) / "cache", quiet=True)
    opts = TaskOptions(batch_size=args.batch_size, num_workers=args.workers, progress=False, cache_dir=None,
                       device=args.device, precision=args.precision)
    return zeroshot_classification(encoder, dataset, opts)


def _peer_loader(shards_dir: Path, split: str, transform, args):
    import torch
    from clip_benchmark.datasets.builder import build_dataset

    task = "zeroshot_classification" if split == "test" else "linear_probe"
    ds = build_dataset("wds/cifar10", root=str(shards_dir), transform=transform, split=split, task=task)
    batched = ds.batched(args.batch_size)
    for attr in ("classes", "templates"):  # evaluate() reads dataloader.dataset.classes
        if not hasattr(batched, attr):
            setattr(batched, attr, getattr(ds, attr))
    return ds, torch.utils.data.DataLoader(batched, batch_size=None, shuffle=False, num_workers=args.workers)


def peer_zeroshot(peer, shards_dir: Path, args) -> dict:
    from clip_benchmark.metrics import zeroshot_classification as zsc

    model, transform, tokenizer = peer
    ds, loader = _peer_loader(shards_dir, "test", transform, args)
    return zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, device=args.device,
                        amp=args.precision != "fp32")


def ours_features(encoder, shards_dir: Path, args) -> dict:
    from polymodal.eval.features import RunOptions, extract_features

    opts = RunOptions(batch_size=args.batch_size, num_workers=args.workers, progress=False, device=args.device,
                      precision=args.precision)
    out = {}
    for split in ("train", "test"):
        f = extract_features(encoder, str(shards_dir / split), opts, labels=True)
        out[split] = (f.image, f.labels)
    return out


def peer_features(peer, shards_dir: Path, args) -> dict:
    import torch
    from clip_benchmark.metrics.linear_probe import Featurizer

    model, transform, _ = peer
    featurizer = Featurizer(model, normalize=True)
    out = {}
    for split in ("train", "test"):
        _, loader = _peer_loader(shards_dir, split, transform, args)
        features, targets = [], []
        with torch.no_grad():
            for images, target in loader:
                with torch.autocast(torch.device(args.device).type, enabled=args.precision != "fp32"):
                    features.append(featurizer(images.to(args.device)).float().cpu())
                targets.append(target)
        out[split] = (torch.cat(features), torch.cat(targets))
    return out


def ours_probe(feats: dict, args, full_sweep: bool = False) -> dict:
    from polymodal.eval.linear_probe import DEFAULT_PATIENCE, linear_probe

    (train_x, train_y), (test_x, test_y) = feats["train"], feats["test"]
    r = linear_probe(train_x, train_y, test_x, test_y, seed=args.seed,
                     patience=None if full_sweep else DEFAULT_PATIENCE)
    return {**{k: r[k] for k in METRICS}, "best_C": r["best_C"],
            "val_acc1_per_C": {str(c): v for c, v in r["val_acc1_per_C"].items()}}


def sklearn_probe(feats: dict, args) -> dict:
    import numpy as np
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from polymodal.eval.linear_probe import DEFAULT_CS, stratified_split
    from polymodal.eval.metrics import classification_metrics

    (train_x, train_y), (test_x, test_y) = feats["train"], feats["test"]
    x, xt = train_x.numpy(), test_x.numpy()
    y, yt = train_y.numpy(), test_y.numpy()
    num_classes = int(max(y.max(), yt.max())) + 1
    mean, std = x.mean(axis=0), x.std(axis=0)  # population std, as StandardScaler and ours
    std = np.where(std > 1e-12, std, 1.0).astype(x.dtype)
    x, xt = (x - mean) / std, (xt - mean) / std
    fit_idx, val_idx = (i.numpy() for i in stratified_split(train_y, 0.2, args.seed))
    val_acc, best_C, not_converged = {}, None, []
    with threadpool_limits(limits=args.threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for C in sorted(DEFAULT_CS):
            n_warn = len(caught)
            clf = LogisticRegression(C=C, max_iter=1000).fit(x[fit_idx], y[fit_idx])
            val_acc[C] = float((clf.predict(x[val_idx]) == y[val_idx]).mean())
            if best_C is None or val_acc[C] > val_acc[best_C]:
                best_C = C
            if any(issubclass(w.category, ConvergenceWarning) for w in caught[n_warn:]):
                not_converged.append(C)
        n_warn = len(caught)
        clf = LogisticRegression(C=best_C, max_iter=1000).fit(x, y)
        refit_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught[n_warn:])
        scores = np.full((len(xt), num_classes), -np.inf, dtype=np.float64)
        scores[:, clf.classes_] = clf.decision_function(xt)
    metrics = classification_metrics(torch.from_numpy(scores), test_y, num_classes)
    return {**metrics, "best_C": best_C, "val_acc1_per_C": {str(c): v for c, v in val_acc.items()},
            "not_converged_C": not_converged, "refit_converged": refit_converged}


# ---------------------------------------------------------------------------------------------------------------
# Report


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(args, runs: dict, images: dict, accuracy_of: dict, per_round_results: dict) -> dict:
    """Per part: each side's seconds (median, min-max), images/s, accuracy, the ratio peer/ours and the verdict."""
    out = {}
    for part, sides in runs.items():
        if not sides["ours"] or not sides["peer"]:
            continue
        entry = {}
        for side in SIDES:
            secs = [r["seconds"] for r in sides[side]]
            med, lo, hi = _median_spread(secs)
            entry[side] = {"seconds": med, "seconds_min": lo, "seconds_max": hi,
                           "images_per_s": images[part] / med if images.get(part) else None,
                           "other_load": [r["other_load"] for r in sides[side]],
                           "disturbed_runs": sum(r["disturbed"] for r in sides[side])}
            entry[side].update(accuracy_of[part][side])
            if "acc1" in accuracy_of[part][side]:  # every round computes the same numbers, up to float noise
                entry[side]["acc1_per_round"] = [r.get("acc1") for r in per_round_results[part][side]]
        per_round = [p["seconds"] / o["seconds"] for o, p in zip(sides["ours"], sides["peer"])]
        entry["ratio"] = entry["peer"]["seconds"] / entry["ours"]["seconds"]
        entry["ratio_per_round"] = per_round
        keys = [k for k in METRICS if k in accuracy_of[part]["ours"] and k in accuracy_of[part]["peer"]]
        diffs = {k: 100 * (accuracy_of[part]["ours"][k] - accuracy_of[part]["peer"][k]) for k in keys}
        entry["accuracy_diff_points"] = diffs  # ours - peer, in percentage points
        # Equal = not worse than the peer by more than the tolerance (1e-6: 0.1 points must not fail on rounding).
        entry["equal_accuracy"] = all(d >= -args.tolerance - 1e-6 for d in diffs.values()) if diffs else None
        entry["goal_met"] = bool(entry["ratio"] >= GOAL and entry["equal_accuracy"]) \
            if entry["equal_accuracy"] is not None else None
        out[part] = entry
    return out


PART_TITLES = {"zeroshot": "zero-shot (test)", "features": "features (train+test)", "probe_fit": "probe fit",
               "probe_fit_full": "probe fit, every C", "probe_e2e": "probe end to end"}
PEER_NAMES = {"zeroshot": "CLIP_benchmark", "features": "CLIP_bench-style", "probe_fit": "scikit-learn",
              "probe_fit_full": "scikit-learn", "probe_e2e": "CB feats+sklearn"}


def print_table(args, res: dict, meta: dict) -> None:
    print(f"\n{meta['model_desc']}, batch {args.batch_size}, {args.workers} workers, {args.threads} threads, fp32, "
          f"cpu; CIFAR-10 {meta['test_images']} test / {meta['train_images']} train images; {args.rounds} round(s); "
          "seconds are medians [min-max] over rounds")
    header = (f"{'part':23s}{'side':18s}{'seconds':>9s}{'[min-max]':>17s}{'img/s':>8s}{'acc1':>8s}{'acc5':>8s}"
              f"{'mpcr':>8s}{'C':>8s}{'other load':>12s}")
    print(header)
    print("-" * len(header))
    for part, entry in res.items():
        for side in SIDES:
            e = entry[side]
            name = "ours" if side == "ours" else PEER_NAMES[part]
            acc = "".join(f"{100 * e[k]:8.2f}" if k in e else f"{'':8s}" for k in METRICS)
            c = f"{e['best_C']:8g}" if "best_C" in e else f"{'':8s}"
            loads = "/".join(f"{100 * v:.0f}%" for v in e["other_load"] if v is not None)
            spread = f"[{e['seconds_min']:.2f}-{e['seconds_max']:.2f}]"
            per_s = f"{e['images_per_s']:.0f}" if e["images_per_s"] else ""
            print(f"{PART_TITLES[part] if side == 'ours' else '':23s}{name:18s}{e['seconds']:9.2f}{spread:>17s}"
                  f"{per_s:>8s}{acc}{c}{loads:>12s}")
    print()
    for part, entry in res.items():
        rounds = ", ".join(f"{v:.2f}" for v in entry["ratio_per_round"])
        diffs = ", ".join(f"{k} {v + 0.0:+.2f}" for k, v in entry["accuracy_diff_points"].items())
        verdict = ("" if entry["goal_met"] is None else
                   f"; goal >= {GOAL:g}x at equal accuracy: {'MET' if entry['goal_met'] else 'NOT met'}")
        equal = ("" if entry["equal_accuracy"] is None else
                 f" -> {'equal or better' if entry['equal_accuracy'] else 'LOWER'} (tolerance {args.tolerance:g} pt)")
        accuracy = f"; ours - peer accuracy (points): {diffs}{equal}" if diffs else ""
        print(f"{PART_TITLES[part]}: {PEER_NAMES[part]}/ours time {entry['ratio']:.2f}x (per round {rounds})"
              f"{accuracy}{verdict}")
    if "probe_fit" in res:
        p = res["probe_fit"]
        print(f"probe: best C ours {p['ours']['best_C']:g}, scikit-learn {p['peer']['best_C']:g}"
              + (f"; scikit-learn hit max_iter=1000 at C = {', '.join(f'{c:g}' for c in p['peer']['not_converged_C'])}"
                 if p["peer"].get("not_converged_C") else ""))
    if any(e[s]["disturbed_runs"] for e in res.values() for s in SIDES):
        print(f"some runs had other processes above {args.max_other_load:.0%} of the CPUs (other load column): "
              "their times are inflated")
    loads = [v for e in res.values() for s in SIDES for v in e[s]["other_load"] if v is not None]
    free = (os.cpu_count() or 1) * (1 - max(loads, default=0.0))
    if args.threads > 1 and args.threads > free + 0.25:
        print(f"WARNING: other processes left about {free:.1f} of {os.cpu_count()} CPUs free but both sides ran "
              f"{args.threads} threads: thread contention inflates the times (the probe fits most); rerun with "
              f"--threads {max(1, int(free + 0.25))} or on a quiet machine")


def versions(device: str) -> dict:
    out = machine_info("torch", "open_clip", "sklearn", "numpy", device=device)
    for dist in ("clip-benchmark", "webdataset", "threadpoolctl", "Pillow"):  # clip_benchmark.__version__ is wrong
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:polymodal-tiny-vit",
                        help="a polymodal eval model spec (default: %(default)s, random init from --seed)")
    parser.add_argument("--weights", default=None,
                        help="an open_clip checkpoint file for --model open_clip:NAME (both sides use it)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per batch, both sides (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data workers, both sides (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], both sides (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="ours: autocast to this; CLIP_benchmark: its amp switch (autocast's default half type "
                             "on the device) whenever this is not fp32 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and scikit-learn's BLAS threads (default: the usable CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 2, quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="model init, probe validation split (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="training images for the probe (default: 10000, quick: 2000)")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="test images (default: all 10000, quick: 2000)")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="points our accuracy may fall below the peer's and still count as equal "
                             "(default: %(default)s)")
    add_quiet_options(parser, "marked", max_wait=None, max_wait_default="60, quick: 10")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar10/{test,train}.tar.gz (default: %(default)s)")
    parser.add_argument("--shards-dir", default=None,
                        help="CLIP_benchmark-layout shards, written there once (default: bench-out/cifar10, or "
                             "bench-out/cifar10-testN with --test-limit N)")
    parser.add_argument("--work-dir", default="bench-out/eval-speed", help="scratch folder (default: %(default)s)")
    parser.add_argument("--out", default="bench-out/eval_speed.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2,000 test and train images, 1 round: a smoke run")
    args = parser.parse_args(argv)
    resolve_settings(args)
    t_start = time.perf_counter()

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)
    # CLIP_benchmark builds its WebDataset without shardshuffle (it reads shards in order either way)
    warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
    try:
        import clip_benchmark.metrics.zeroshot_classification  # noqa: F401
        from clip_benchmark.datasets.builder import build_dataset  # noqa: F401
    except ImportError as exc:
        sys.exit(f"CLIP_benchmark is not importable ({exc}): pip install clip-benchmark requests")
    patch_clip_benchmark()

    shards_dir, written = ensure_data(args)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    encoder, peer = build_models(args)
    torch.set_num_threads(args.threads)
    warm_up(encoder, peer)
    params = sum(p.numel() for p in encoder.parameters())
    test_images = _split_samples(shards_dir / "test")
    train_images = _split_samples(shards_dir / "train")
    kind, _, rest = args.model.partition(":")
    random_init = kind in ("open_clip", "timm") and ":" not in rest
    model_desc = (f"{args.model}{f' (random init, seed {args.seed})' if random_init else ''} at "
                  f"{encoder.image_size} px, {params / 1e6:.1f} M parameters")
    print(f"[setup] {model_desc}; shards {shards_dir} ({test_images} test, {train_images} train); batch "
          f"{args.batch_size}, {args.workers} workers, {args.threads} threads; {args.rounds} round(s)"
          + ("" if peer else "; not an open_clip two-tower model: only the probe fit is compared"), flush=True)

    parts = (["zeroshot", "features"] if peer else ["features"]) + ["probe_fit", "probe_fit_full"]
    runs: dict = {p: {s: [] for s in SIDES} for p in parts}
    results: dict = {p: {s: [] for s in SIDES} for p in parts}
    feats: dict = {}
    details: dict = {p: {} for p in parts if p != "features"}  # first round's full results
    for rnd in range(args.rounds):
        order = SIDES if rnd % 2 == 0 else SIDES[::-1]
        for part in parts:
            for side in order:
                if part == "features" and side == "peer" and peer is None:
                    continue
                if part == "probe_fit_full" and side == "peer":  # the same scikit-learn fit: reuse its run
                    runs[part][side].append(runs["probe_fit"]["peer"][rnd])
                    results[part][side].append(results["probe_fit"]["peer"][rnd])
                    details[part][side] = details["probe_fit"]["peer"]
                    continue
                if part == "zeroshot":
                    fn = (lambda: ours_zeroshot(encoder, shards_dir, args)) if side == "ours" else \
                        (lambda: peer_zeroshot(peer, shards_dir, args))
                elif part == "features":
                    fn = (lambda: ours_features(encoder, shards_dir, args)) if side == "ours" else \
                        (lambda: peer_features(peer, shards_dir, args))
                else:  # both fits on our features (of the first round: every round's are the same)
                    full = part == "probe_fit_full"
                    fn = (lambda: ours_probe(feats["ours"], args, full)) if side == "ours" else \
                        (lambda: sklearn_probe(feats["ours"], args))
                result, rec = timed(fn, args.max_other_load, args.max_wait)
                runs[part][side].append(rec)
                if part == "features":
                    feats.setdefault(side, result)
                    summary = {s: int(result[s][1].numel()) for s in ("train", "test")}
                else:
                    summary = {k: v for k, v in result.items() if k in METRICS or k == "best_C"}
                results[part][side].append(summary)
                if part != "features":
                    details[part].setdefault(side, result)
                shown = ", ".join(f"{k} {100 * v:.2f}" if k in METRICS else f"{k} {v:g}" for k, v in summary.items())
                print(f"[round {rnd + 1}/{args.rounds}] {PART_TITLES[part]:22s} {side:5s} {rec['seconds']:8.2f}s"
                      f"  {shown}; load avg {rec['load_avg_before']:.2f}"
                      + (f", other processes {100 * rec['other_load']:.0f}% of the CPUs"
                         if rec["other_load"] is not None else "") + (" (disturbed)" if rec["disturbed"] else ""),
                      flush=True)

    # End to end probe: features + fit, per round (CLIP_benchmark-style extraction + scikit-learn for the peer).
    if peer:
        runs["probe_e2e"] = {s: [{**f, "seconds": f["seconds"] + p["seconds"],
                                  "other_load": max((v for v in (f["other_load"], p["other_load"]) if v is not None),
                                                    default=None),
                                  "disturbed": f["disturbed"] or p["disturbed"]}
                                 for f, p in zip(runs["features"][s], runs["probe_fit"][s])] for s in SIDES}
        results["probe_e2e"] = results["probe_fit"]
    # Accuracy of each side: the first round's (the JSON has every round's).
    accuracy_of = {}
    for part in runs:
        if part == "features":
            accuracy_of[part] = {s: {} for s in SIDES}
        else:
            accuracy_of[part] = {s: results[part][s][0] for s in SIDES}
    images = {"zeroshot": test_images, "features": (test_images or 0) + (train_images or 0)}
    res = summarize(args, runs, images, accuracy_of, results)
    feature_check = None
    if peer and "peer" in feats:
        o, p = feats["ours"], feats["peer"]
        n = int(max(o["test"][1].max(), p["test"][1].max())) + 1
        feature_check = {"train_count": [len(o["train"][0]), len(p["train"][0])],
                         "test_count": [len(o["test"][0]), len(p["test"][0])],
                         "test_label_histogram_equal": bool(torch.equal(torch.bincount(o["test"][1], minlength=n),
                                                                        torch.bincount(p["test"][1], minlength=n)))}
    meta = {"model_desc": model_desc, "test_images": test_images, "train_images": train_images}
    print_table(args, res, meta)
    goal_parts = [p for p in ("zeroshot", "probe_fit") if p in res]
    met = [res[p]["goal_met"] for p in goal_parts]
    print(f"\ngoal (ours >= {GOAL:g}x faster at equal accuracy): "
          + ", ".join(f"{PART_TITLES[p]} {'MET' if m else 'NOT met'}" for p, m in zip(goal_parts, met))
          + f" -> {'MET' if all(met) else 'NOT met'}")

    report = {
        "benchmark": "benchmarks/eval_speed.py",
        "what": "zero-shot classification and linear probe on CIFAR-10, ours (polymodal.eval) vs CLIP_benchmark "
                "(zero-shot, feature extraction) and scikit-learn LogisticRegression (probe fit), same model "
                f"object, data, batch size, workers and threads, {args.precision} on {args.device}",
        "goal": f"peer seconds / our seconds >= {GOAL} at equal accuracy (ours at most {args.tolerance} points below)",
        "goal_met": all(met),
        "settings": {k: getattr(args, k) for k in ("model", "weights", "image_size", "batch_size", "workers",
                                                   "device", "precision", "threads", "rounds", "seed", "train_limit", "test_limit",
                                                   "tolerance", "max_other_load", "max_wait", "quick")},
        "model": {"spec": args.model, "image_size": encoder.image_size, "parameters": params,
                  "random_init": random_init},
        "data": {"shards_dir": str(shards_dir), "test_images": test_images, "train_images": train_images,
                 "splits": written,
                 "classnames": (shards_dir / "classnames.txt").read_text().split("\n")[:-1],
                 "templates": (shards_dir / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1]},
        "results": res,
        "feature_check": feature_check,
        "runs": {part: {s: [{**r, "result": results[part][s][i] if i < len(results[part][s]) else None}
                            for i, r in enumerate(runs[part][s])] for s in SIDES} for part in runs},
        "details": details,
        "machine": {**versions(args.device), "load_avg_end": os.getloadavg()},
    }
    return finish(args.out, report, t_start)


if __name__ == "__main__":
    sys.exit(main())
