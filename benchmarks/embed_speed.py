"""Embedding speed: `polymodal embed` against a straightforward open_clip loop, same model, data, batch and threads.

One process, one model (open_clip, built from the same spec and seed on both sides), timed in interleaved rounds
(ours, peer, peer, ours, ...), each end to end from the shards to embeddings and metadata on disk:

  ours  polymodal.cli.main(["embed", ...]): loader workers read and decode whole shards (JPEGs decoded at reduced
        size when the model's input is smaller, resized with torch) while the main process encodes; per shard an
        img_emb .npy and a metadata parquet
  peer  what a user writes around open_clip: build the model and its eval transform (seeded as ours), then for
        each shard, tarfile -> PIL.Image.open -> open_clip's eval
        transform (preprocess from create_model_and_transforms) -> batches of B -> model.encode_image ->
        F.normalize, all in one loop in the main process; then one .npy and one parquet of keys

Both use --threads torch threads; ours adds --workers loader processes, which is the point: reading overlaps with
compute. Both write float32. The report gives samples/s per side, the ratio (goal: ours >= 1.3x the peer on a
CPU) and how close the two sides' embeddings are (cosine per row: the pixels differ a little, PIL's resize
against torch's, and reduced-size JPEG decoding).

Data (--data): imagenet (default), the 1,000 ImageNet sample photos (median 500x375 JPEG), written once into
shards of 125 under --shards-dir; or cifar10, the 10,000 CIFAR-10 test images (32x32 JPEG) in shards of 1,000.

    python benchmarks/embed_speed.py                      # imagenet photos, tiny CLIP at 64 px, 2 rounds
    python benchmarks/embed_speed.py --model open_clip:ViT-B-32 --rounds 1
    python benchmarks/embed_speed.py --data cifar10 --quick
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

from bench_common import add_quiet_options, machine_basics, timed, write_report

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.3
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def ensure_shards(args) -> str:
    out = Path(args.shards_dir) / args.data
    if not ((out / "stats.json").exists() and any(out.glob("*.tar"))):
        if args.data == "imagenet":
            source, extra = Path(args.data_root) / "imagenet-samples" / "captions_wordnet.jsonl", \
                ["--caption", "{label}: {gloss}", "--samples-per-shard", "125"]
        else:
            source, extra = Path(args.data_root) / "cifar10" / "test.tar.gz", ["--samples-per-shard", "1000"]
        if not source.exists():
            sys.exit(f"{source} not found: pass --data-root (the folder holding the shared data)")
        subprocess.run([sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out), *extra,
                        "--overwrite", "-q"], check=True, cwd=REPO)
    shards = sorted(out.glob("*.tar"), key=lambda p: int(p.name.split(".")[0]))
    return str(out.resolve() / f"{{0..{len(shards) - 1}}}.tar")


def build_peer(args, name: str, weights: str):
    """open_clip's model and eval transform, as the user's script builds them (timed with the loop, as our side's
    model loading is)."""
    import open_clip
    import torch

    from polymodal.models import open_clip_towers

    torch.manual_seed(args.seed)  # polymodal embed seeds the same way: identical random weights
    model = open_clip_towers.create(name, weights or None).eval()
    pre = model.visual.preprocess_cfg
    return model, open_clip.image_transform(model.visual.image_size, is_train=False, mean=pre["mean"], std=pre["std"])


def peer_embed(args, name: str, weights: str, urls: list[str], out: Path) -> int:
    """The straightforward loop: read, decode, transform and encode one after the other."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, preprocess = build_peer(args, name, weights)
    batch_size = args.batch_size
    keys, embeddings, images, batch_keys = [], [], [], []

    def flush():
        with torch.no_grad():
            embeddings.append(F.normalize(model.encode_image(torch.stack(images)), dim=-1).numpy())
        keys.extend(batch_keys)
        images.clear()
        batch_keys.clear()

    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if not member.isfile() or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                images.append(preprocess(image))
                batch_keys.append(stem)
                if len(images) == batch_size:
                    flush()
    if images:
        flush()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "img_emb.npy", np.concatenate(embeddings))
    pq.write_table(pa.table({"key": keys}), out / "metadata.parquet")
    return len(keys)


def ours_embed(args, shards: str, out: Path) -> int:
    from polymodal.cli import main as polymodal_main

    code = polymodal_main(["embed", "--model", args.model, "--input", shards, "--output", str(out), "--what",
                           "image", "--dtype", "float32", "--batch-size", str(args.batch_size), "--workers",
                           str(args.workers), "--seed", str(args.seed), "--overwrite", "-q"])
    if code != 0:
        sys.exit(f"polymodal embed failed with exit code {code}")
    return sum(len(m) for m in _our_keys(out))


def _our_keys(out: Path) -> list[list[str]]:
    import pyarrow.parquet as pq

    parts = sorted((out / "metadata").glob("metadata_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    return [pq.read_table(p).column("key").to_pylist() for p in parts]


def compare(ours: Path, peer: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    keys = [k for part in _our_keys(ours) for k in part]
    parts = sorted((ours / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[2]))
    mine = np.concatenate([np.load(p) for p in parts])
    theirs = np.load(peer / "img_emb.npy")
    peer_keys = pq.read_table(peer / "metadata.parquet").column("key").to_pylist()
    order = {k: i for i, k in enumerate(peer_keys)}
    same_keys = sorted(keys) == sorted(peer_keys)
    cos = (mine * theirs[[order[k] for k in keys]]).sum(axis=1) if same_keys else np.zeros(1)
    return {"rows": [len(keys), len(peer_keys)], "same_keys": same_keys, "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min())}


def timed_run(args, fn) -> dict:
    """fn() returns how many rows it embedded; its timing record (timed's) with that count and the rate."""
    rows, rec = timed(fn, args.max_other_load, args.max_wait)  # loader workers count as ours once reaped
    return {**rec, "rows": rows, "samples_per_s": rows / rec["seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip:polymodal-tiny-vit",
                        help="an open_clip spec, open_clip:NAME[:WEIGHTS] (default: %(default)s, random init)")
    parser.add_argument("--data", choices=["imagenet", "cifar10"], default="imagenet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="our loader processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: the CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--shards-dir", default="bench-out/embed-speed-shards")
    parser.add_argument("--work-dir", default="bench-out/embed-speed")
    parser.add_argument("--out", default="bench-out/embed_speed.json")
    add_quiet_options(parser)
    parser.add_argument("--quick", action="store_true", help="1 round")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    kind, _, rest = args.model.partition(":")
    if kind != "open_clip" or not rest:
        sys.exit("--model must be open_clip:NAME[:WEIGHTS] (the peer is an open_clip loop)")

    import torch

    from polymodal.data.shardlist import expand_shards

    torch.set_num_threads(args.threads)
    shards = ensure_shards(args)
    urls = expand_shards(shards)
    name, _, weights = rest.partition(":")
    model, _ = build_peer(args, name, weights)  # warms the imports and open_clip's config registry for both sides
    work = Path(args.work_dir)
    print(f"[setup] {args.model} at {model.visual.image_size} px; {len(urls)} shards of {args.data}; batch "
          f"{args.batch_size}, {args.threads} threads, our loader workers {args.workers}; {args.rounds} round(s)",
          flush=True)

    runs = {"ours": [], "peer": []}
    for rnd in range(args.rounds):
        for side in (("ours", "peer") if rnd % 2 == 0 else ("peer", "ours")):
            out = work / side
            fn = (lambda: ours_embed(args, shards, out)) if side == "ours" else \
                (lambda: peer_embed(args, name, weights, urls, out))
            rec = timed_run(args, fn)
            runs[side].append(rec)
            load = f", other processes {100 * rec['other_load']:.0f}% of the CPUs" if rec["other_load"] is not None \
                else ""
            print(f"[round {rnd + 1}] {side:4s} {rec['rows']} samples in {rec['seconds']:.2f}s "
                  f"({rec['samples_per_s']:.1f}/s){load}", flush=True)
    check = compare(work / "ours", work / "peer")
    med = {s: statistics.median(r["samples_per_s"] for r in runs[s]) for s in runs}
    ratio = med["ours"] / med["peer"]
    print(f"\nsamples/s (median of {args.rounds}): ours {med['ours']:.1f}, open_clip loop {med['peer']:.1f} -> "
          f"{ratio:.2f}x (goal >= {GOAL}x: {'MET' if ratio >= GOAL else 'NOT met'}); same keys: "
          f"{check['same_keys']}, cosine ours vs peer mean {check['cosine_mean']:.4f} (min {check['cosine_min']:.4f})")
    report = {"benchmark": "benchmarks/embed_speed.py",
              "what": "image embedding extraction, polymodal embed vs a straightforward open_clip loop",
              "settings": {k: getattr(args, k) for k in ("model", "data", "batch_size", "workers", "threads",
                                                         "rounds", "seed")},
              "shards": shards, "machine": machine_basics(), "runs": runs, "samples_per_s": med, "ratio": ratio,
              "goal": GOAL, "goal_met": ratio >= GOAL, "check": check}
    path = write_report(args.out, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
