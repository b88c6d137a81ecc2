"""`polymodal eval`: evaluate models on datasets (zero-shot, retrieval, linear probe, kNN)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from polymodal.data.errors import ConfigError

log = logging.getLogger("polymodal")

DESCRIPTION = """\
Evaluate each --model on each --dataset with each --task, CLIP_benchmark's metric definitions and JSON layout.
Features are computed on every rank at once under torchrun/srun/accelerate (the same numbers as one rank).

models:   RUN_DIR or FILE.safetensors (a polymodal checkpoint, any objective); open_clip:NAME[:WEIGHTS_FILE];
          timm:NAME[:WEIGHTS_FILE]; efficientnet-lite0 (the packaged ImageNet weights). Nothing is downloaded.
datasets: a CLIP_benchmark WebDataset root (DIR/test, DIR/train, classnames.txt, templates), a shard folder or
          pattern, or a raw source (image folder with class subfolders, .tar.gz of one, IDX .gz, .npz, table)
          converted once into the cache. NAME=SPEC names it in the results.
tasks:    auto (everything the model and dataset allow), zeroshot_classification, zeroshot_retrieval,
          linear_probe, knn."""

EPILOG = """\
examples:
  polymodal eval --model runs/align-mixed --dataset out/cifar10 --dataset out/fmnist
  polymodal eval --model efficientnet-lite0 --dataset out/cifar10 --task linear_probe --task knn --few-shot 10
  polymodal eval --model open_clip:ViT-B-32:weights.pt --dataset inet=out/imagenet --templates openai_imagenet
  torchrun --nproc-per-node 8 -m polymodal eval --model runs/clip --dataset out/cifar10 --precision bf16

Output: OUTPUT/{dataset}_{model}_{task}.json each; with several results also results.csv, results.md and
results.png. Exit codes: 0 done, 2 bad input (one line naming it)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`polymodal eval`."""
    parser = commands.add_parser("eval", help="zero-shot, retrieval, linear probe and kNN evaluation",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, help="model spec (repeat for several)")
    parser.add_argument("--dataset", action="append", required=True, help="dataset spec (repeat for several)")
    parser.add_argument("--task", action="append", default=None,
                        help="task (repeat for several; default: auto)")
    parser.add_argument("--train", help="training split for linear probe / kNN when the dataset has no train/ "
                                        "folder (one dataset only)")
    parser.add_argument("--output", default="eval-out", help="results folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast precision of the encoders (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU, else cpu)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution (default: the model's training resolution)")
    parser.add_argument("--templates", default=None,
                        help="zero-shot prompts: a file (one per line, {c} = class name), 'openai_imagenet' (the "
                             "CLIP paper's 80), or one template (default: the dataset's templates file)")
    parser.add_argument("--classnames", default=None,
                        help="class names, a file or a comma-separated list (default: the dataset's classnames.txt)")
    parser.add_argument("--few-shot", type=int, default=None, help="linear probe: k training samples per class")
    parser.add_argument("--probe-c", type=float, action="append", default=None, metavar="C",
                        help="linear probe: a C (inverse L2 strength) to sweep, repeatable (default: 1e-4 ... 1e4, "
                             "one per decade)")
    parser.add_argument("--probe-patience", type=int, default=2,
                        help="linear probe: stop the C sweep after this many C's in a row without a better "
                             "validation accuracy; 0 sweeps them all (default: %(default)s)")
    parser.add_argument("--knn-k", type=int, default=20, help="kNN neighbours (default: %(default)s)")
    parser.add_argument("--knn-temperature", type=float, default=0.07, help="kNN vote temperature (default: 0.07)")
    parser.add_argument("--seed", type=int, default=0,
                        help="few-shot sampling, the probe's validation split, randomly initialised weights")
    parser.add_argument("--cache-dir", default=None,
                        help="image features and converted datasets (default: $POLYMODAL_CACHE or "
                             "~/.cache/polymodal)")
    parser.add_argument("--no-cache", action="store_true", help="do not cache image features")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from polymodal.cli_args import lines_or_list
    from polymodal.eval.datasets import resolve_dataset, template_option
    from polymodal.eval.encoders import load_seeded_encoder
    from polymodal.eval.suite import run_suite
    from polymodal.eval.tasks import TASKS, TaskOptions, cache_folder
    from polymodal.pretrain.distributed import shutdown, start_process_group

    tasks = args.task or ["auto"]
    unknown = [t for t in tasks if t not in (*TASKS, "auto")]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; choose from auto, {', '.join(TASKS)}")
    if args.train and len(args.dataset) > 1:
        raise ConfigError("--train names one dataset's training split: give a single --dataset with it")
    world = start_process_group()
    try:
        device = args.device or str(world.device)
        cache = cache_folder(args.cache_dir)
        classnames = lines_or_list(args.classnames)
        templates = template_option(args.templates)
        datasets = [resolve_dataset(spec, train=args.train, cache_dir=cache / "datasets", classnames=classnames,
                                    templates=templates, quiet=args.quiet) for spec in args.dataset]
        opts = TaskOptions(batch_size=args.batch_size, num_workers=args.workers, device=device,
                           precision=args.precision, progress=not args.quiet and world.is_main,
                           cache_dir=None if args.no_cache else str(cache / "features"), few_shot=args.few_shot,
                           probe_cs=args.probe_c, probe_patience=args.probe_patience or None, knn_k=args.knn_k,
                           knn_temperature=args.knn_temperature, seed=args.seed)
        t0 = time.perf_counter()
        # Encoding runs under no_grad; not inference_mode, whose tensors the linear probe could not fit on.
        results = run_suite(args.model, lambda spec: load_seeded_encoder(spec, args.image_size, args.seed, device),
                            datasets, tasks, opts, Path(args.output), is_main=world.is_main)
        if world.is_main:
            print(f"{len(results)} result(s) in {args.output} ({time.perf_counter() - t0:.0f}s"
                  f"{f', {world.world_size} ranks' if world.world_size > 1 else ''})")
    finally:
        shutdown()
    return 0
