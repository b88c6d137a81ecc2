"""`polymodal data ...`: write shards from common layouts, inspect them, stream them through the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import re
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

    for name in modalities.names():
        m = modalities.get(name)
        print(f"{name:<8} .{', .'.join(m.extensions):<28} {m.description}")
    return 0


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
