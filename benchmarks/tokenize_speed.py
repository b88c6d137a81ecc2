"""Pre-tokenizing speed: `polymodal data tokenize` against an ml-4m-style writer, same tokenizer, data and machine;
then the encode speed of each image tokenizer at batch 256.

Part 1, images/s from source shards to token shards, timed in interleaved rounds (ours, peer, peer, ours, ...):

  ours  polymodal.data.shard_map.map_shards with TokenizeJob (what `polymodal data tokenize` runs): loader workers
        read and decode whole shards, cut the crops and, on the CPU, encode them too (one torch thread each);
        this process writes each shard's token set as one tar, members in memory, no intermediate files
  peer  ml-4m's way (its save_vq_tokens.py, then a separate pass to tar): a torch DataLoader with the same number
        of workers decodes the same samples with the same crops, this process encodes the same batches with the
        same tokenizer, then np.save writes one .npy file per sample (the [crops, h, w] tokens) and one per
        sample for the crop settings, in a folder per source shard; a second pass reads the files back and writes
        them into tar shards with webdataset's ShardWriter (how ml-4m's tools make shards of a folder)

Both sides write the same token arrays (the share of ids that agree is reported: our channels-last convolutions
sum in another order, which flips the odd FSQ id sitting on a bin edge, about 1 in 100,000), uint16 on ours (int16
in ml-4m). Goal: ours >= 2x the peer.

Part 2, encode images/s of each image tokenizer (FSQ [8,5,5,5], VQ 1024 codes; width 64, 4x downsampling) at
batch 256 and 32 and 64 px, on the CPU, or on --device cuda.

    python benchmarks/tokenize_speed.py                      # CIFAR-10 test (10,000 images), 2 rounds
    python benchmarks/tokenize_speed.py --quick              # 3 shards, 1 round
    python benchmarks/tokenize_speed.py --tokenizer runs/tok-fsq --crops 4
    python benchmarks/tokenize_speed.py --device cuda --encode-only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench_common import add_quiet_options, machine_info, timed, write_report

REPO = Path(__file__).resolve().parent.parent
GOAL = 2.0


def ensure_shards(args) -> list[str]:
    out = Path(args.shards_dir) / "cifar10-test"
    if not ((out / "stats.json").exists() and any(out.glob("*.tar"))):
        source = Path(args.data_root) / "cifar10" / "test.tar.gz"
        if not source.exists():
            sys.exit(f"{source} not found: pass --data-root (the folder holding the shared data)")
        subprocess.run([sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out),
                        "--samples-per-shard", "1000", "--overwrite", "-q"], check=True, cwd=REPO)
    shards = sorted(out.glob("*.tar"), key=lambda p: int(p.name.split(".")[0]))
    return [str(p.resolve()) for p in shards[: 3 if args.quick else None]]


def tokenizer_run(args) -> str:
    """A trained tokenizer run (--tokenizer), or an export of a freshly initialised FSQ tokenizer of the default
    architecture (encode speed does not depend on training)."""
    if args.tokenizer:
        return args.tokenizer
    import torch

    from polymodal.pretrain.export import write_safetensors
    from polymodal.pretrain.objectives import build_objective

    out = Path(args.work_dir) / "fsq-init"
    torch.manual_seed(0)
    section = {"name": "fsq", "width": args.width}
    write_safetensors(build_objective(section).state_dict(), out / "model.safetensors",
                      {"polymodal.objective": json.dumps(section), "polymodal.step": "0",
                       "polymodal.image_size": "32"})
    return str(out)


def ours(args, urls: list[str], run: str, out: Path) -> int:
    from polymodal.data.shard_map import map_shards
    from polymodal.data.tokenize_shards import TokenizeJob, TokenizeOptions

    shutil.rmtree(out, ignore_errors=True)
    job = TokenizeJob({"rgb": run}, {}, TokenizeOptions(crops=args.crops, batch_size=args.batch_size))
    result = map_shards(urls, out, job, workers=args.workers, show_progress=False)
    return result["samples"]


class _PeerSamples:
    """ml-4m's side of the DataLoader: each worker decodes its shards' samples with the same crops as ours."""

    def __init__(self, urls, job):
        self.urls, self.job = urls, job

    def __call__(self):
        import torch

        from polymodal.data.shard_map import sample_rng, shard_name
        from polymodal.data.tar_samples import iter_shard

        info = torch.utils.data.get_worker_info()
        for url in self.urls[info.id::info.num_workers] if info else self.urls:
            name = shard_name(url)
            for index, raw in iter_shard(url, None):
                sample = self.job.decode(raw, sample_rng(0, name, index))
                yield name, raw["__key__"], torch.from_numpy(sample["rgb"]), sample["crops"]


def peer(args, urls: list[str], run: str, out: Path) -> int:
    import numpy as np
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader, IterableDataset

    from polymodal.data.tokenize_shards import TokenizeJob, TokenizeOptions
    from polymodal.tokenizers.registry import load_image_tokenizer

    shutil.rmtree(out, ignore_errors=True)
    job = TokenizeJob({"rgb": run}, {}, TokenizeOptions(crops=args.crops))  # its decode and crops only
    objective, _ = load_image_tokenizer(run)  # the model as ml-4m holds it: a plain module, default layout
    source = _PeerSamples(urls, job)

    class Samples(IterableDataset):
        def __iter__(self):
            return source()

    def collate(items):
        return ([i[0] for i in items], [i[1] for i in items], torch.cat([i[2] for i in items]),
                [i[3] for i in items])

    files = out / "files"
    count = 0
    loader = DataLoader(Samples(), batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
    with torch.no_grad():
        for shards, keys, pixels, crops in loader:
            ids = objective.tokenizer_model.encode(objective.inputs({"rgb": pixels}))
            ids = ids.view(len(keys), args.crops, *ids.shape[1:]).numpy().astype(np.int16)
            for shard, key, tokens, crop in zip(shards, keys, ids, crops):
                folder = files / shard
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{key}.npy", tokens)
                np.save(folder / f"{key}.crop_settings.npy", crop)
                count += 1
    # The second pass: a folder of .npy files per shard into a tar shard.
    (out / "shards").mkdir(parents=True)
    for folder in sorted(files.iterdir()):
        with wds.TarWriter(str(out / "shards" / folder.name)) as sink:
            for path in sorted(folder.glob("*.npy")):
                if path.name.endswith(".crop_settings.npy"):
                    continue
                key = path.name[: -len(".npy")]
                sink.write({"__key__": key, "tok_rgb.npy": path.read_bytes(),
                            "crop_settings.npy": (folder / f"{key}.crop_settings.npy").read_bytes()})
    return count


def token_agreement(ours_dir: Path, peer_dir: Path) -> float:
    """The share of token ids on which the two sides agree (0 when their keys differ). Not always 1: our
    channels-last convolutions sum in another order, and FSQ's rounding flips an id that sits on a bin edge."""
    import numpy as np

    same = total = 0
    for shard in sorted((ours_dir / "tok_rgb").glob("*.tar")):
        def arrays(path):
            with tarfile.open(path) as tar:
                return {m.name.split(".", 1)[0]: np.load(io.BytesIO(tar.extractfile(m).read())).astype(np.int64)
                        for m in tar.getmembers() if m.name.endswith(".tok_rgb.npy")}

        mine, theirs = arrays(shard), arrays(peer_dir / "shards" / shard.name)
        if mine.keys() != theirs.keys():
            return 0.0
        same += sum(int((mine[k] == theirs[k]).sum()) for k in mine)
        total += sum(mine[k].size for k in mine)
    return same / max(total, 1)


def encode_speed(args) -> dict:
    import torch

    from polymodal.tokenizers.image import ImageTokenizer

    device = torch.device(args.device)
    out = {}
    for quantizer in ("fsq", "vq"):
        torch.manual_seed(0)
        tok = ImageTokenizer(quantizer, width=args.width).to(device).eval()
        for size in (32, 64):
            x = torch.rand(256, 3, size, size, device=device) * 2 - 1
            tok.encode(x)  # warm-up (and VQ's k-means initialisation)
            rates = []
            for _ in range(3):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tok.encode(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates.append(256 / (time.perf_counter() - t0))
            out[f"{quantizer}@{size}px"] = statistics.median(rates)
            print(f"[encode] {quantizer} {size} px, batch 256 on {device}: {out[f'{quantizer}@{size}px']:.0f} "
                  "images/s", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a trained fsq/vqvae run folder (default: a fresh FSQ export)")
    parser.add_argument("--width", type=int, default=64, help="tokenizer width when none is given (default 64)")
    parser.add_argument("--crops", type=int, default=1, help="crops per sample (default 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="loader processes, both sides (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    parser.add_argument("--device", default="cpu", help="device of the encode-speed part (default cpu)")
    parser.add_argument("--encode-only", action="store_true", help="only part 2, the encode speed")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--shards-dir", default="bench-out/tokenize-speed-shards")
    parser.add_argument("--work-dir", default="bench-out/tokenize-speed")
    parser.add_argument("--out", default="bench-out/tokenize_speed.json")
    add_quiet_options(parser)
    parser.add_argument("--quick", action="store_true", help="3 shards, 1 round")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)

    import torch

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    report = {"benchmark": "benchmarks/tokenize_speed.py",
              "machine": machine_info("torch", "numpy", "webdataset", device=args.device),
              "settings": {k: getattr(args, k) for k in ("tokenizer", "width", "crops", "batch_size", "workers",
                                                         "rounds", "device")}}
    if not args.encode_only:
        urls = ensure_shards(args)
        run = tokenizer_run(args)
        work = Path(args.work_dir)
        runs = {"ours": [], "peer": []}
        print(f"[setup] {len(urls)} CIFAR-10 shards, tokenizer {run}, {args.crops} crop(s), batch "
              f"{args.batch_size}, {args.workers} workers; {args.rounds} round(s)", flush=True)
        for rnd in range(args.rounds):
            for side in (("ours", "peer") if rnd % 2 == 0 else ("peer", "ours")):
                fn = ours if side == "ours" else peer
                rows, rec = timed(lambda: fn(args, urls, run, work / side), args.max_other_load, args.max_wait)
                rec.update(rows=rows, images_per_s=rows / rec["seconds"])
                runs[side].append(rec)
                load = f", other processes {100 * rec['other_load']:.0f}% of the CPUs" \
                    if rec["other_load"] is not None else ""
                print(f"[round {rnd + 1}] {side:4s} {rows} images in {rec['seconds']:.2f}s "
                      f"({rec['images_per_s']:.0f}/s){load}", flush=True)
        med = {s: statistics.median(r["images_per_s"] for r in runs[s]) for s in runs}
        ratio = med["ours"] / med["peer"]
        agreement = token_agreement(work / "ours", work / "peer")
        print(f"\nimages/s (median of {args.rounds}): ours {med['ours']:.0f}, ml-4m-style {med['peer']:.0f} -> "
              f"{ratio:.2f}x (goal >= {GOAL}x: {'MET' if ratio >= GOAL else 'NOT met'}); token ids that agree: "
              f"{100 * agreement:.4f}%")
        report.update(runs=runs, images_per_s=med, ratio=ratio, goal=GOAL, goal_met=ratio >= GOAL,
                      token_agreement=agreement)
    report["encode_images_per_s"] = encode_speed(args)
    path = write_report(args.out, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
