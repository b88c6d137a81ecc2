"""`polymodal pretrain`, `polymodal report` and `polymodal checkpoint ...`."""

from __future__ import annotations

import argparse
from pathlib import Path

from polymodal.data.errors import ConfigError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from polymodal.pretrain.config import load_pretrain_config
    from polymodal.pretrain.loop import pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    result = pretrain(cfg)
    if result.get("rank", 0) == 0 and result["outcome"] == "end":
        print(f"trained to step {result['step']} in {result['run_dir']} ({result['skipped_steps']} skipped steps)"
              + (f"; weights: {result['exported']}" if result["exported"] else ""))
    return 0


def checkpoint_path(run_dir: str, tag: str | None) -> Path:
    """The checkpoint folder `tag` names in RUN_DIR (default: the latest), which must be complete."""
    from polymodal.pretrain import checkpoint

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None or not checkpoint.is_complete(ckpt_dir / tag):
        raise ConfigError(f"no complete checkpoint {tag or ''} in {ckpt_dir}".replace("  ", " "))
    return ckpt_dir / tag


def cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from polymodal.pretrain.distributed import use_cpu_accelerator_if_no_gpu
    from polymodal.pretrain.export import export_checkpoint

    use_cpu_accelerator_if_no_gpu()
    path = checkpoint_path(args.run_dir, args.tag)
    out = export_checkpoint(path, args.format, Path(args.out) if args.out else None)
    print(f"exported {path.name} ({args.format}) to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_checkpoint_universal(args: argparse.Namespace) -> int:
    from polymodal.pretrain.distributed import use_cpu_accelerator_if_no_gpu
    from polymodal.pretrain.export import make_universal

    use_cpu_accelerator_if_no_gpu()
    path = checkpoint_path(args.run_dir, args.tag)
    out = make_universal(path, workers=args.workers)
    print(f"wrote the universal checkpoint {out}; resume=latest at any world size now loads it")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`polymodal pretrain`, `polymodal report` and `polymodal checkpoint` with its subcommands."""
    from polymodal.pretrain.report import add_arguments as report_arguments, cmd_report

    pre = commands.add_parser(
        "pretrain", help="train an objective on shards (DeepSpeed; one CPU process to many GPU nodes)",
        description="Train the objective named in CONFIG (a YAML experiment file) with DeepSpeed. Settings are "
                    "the config's keys, overridden as key=value (nested with dots). Run it directly for one "
                    "process, or under torchrun, srun, the DeepSpeed launcher or accelerate launch (launch/). "
                    "Every path in the config is checked before training starts; relative paths are relative to "
                    "the current folder, and ${demo_data:} names the demo shards inside the package. "
                    "Checkpoints go to RUN_DIR/checkpoints every checkpoint.every steps, at the end and on "
                    "SIGTERM; resume=latest continues the exact trajectory. Metrics go to RUN_DIR/metrics.jsonl "
                    "and TensorBoard (RUN_DIR/tb). Exit codes: 0 done or preempted with a checkpoint, 2 bad "
                    "config, 3 aborted after repeated non-finite steps.",
        epilog="example: polymodal pretrain configs/engine-cifar10.yaml steps=200 zero_stage=2 run_dir=runs/try")
    pre.add_argument("config", help="experiment YAML (see configs/)")
    pre.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="e.g. steps=1000 optim.lr=3e-4 data.batch_size=128 resume=latest")
    pre.set_defaults(func=cmd_pretrain)

    rep = commands.add_parser(
        "report", help="summarise a training run and plot its curves",
        description="Print a summary of RUN_DIR (steps, loss, samples/s, data wait, MFU, memory, skipped steps, "
                    "resumes, checkpoints) and draw loss, learning-rate and throughput curves to a PNG.",
        epilog="example: polymodal report runs/try")
    report_arguments(rep)
    rep.set_defaults(func=cmd_report)

    ckpt = commands.add_parser("checkpoint", help="export or convert training checkpoints",
                               description="Work with the checkpoints in RUN_DIR/checkpoints.")
    ckpt_commands = ckpt.add_subparsers(dest="checkpoint_command", required=True, metavar="SUBCOMMAND")
    export = ckpt_commands.add_parser(
        "export", help="consolidated fp32 weights (any ZeRO stage) to safetensors",
        description="Gather the fp32 master weights of a checkpoint (also from ZeRO-3 shards) into one "
                    "safetensors file. Formats: polymodal (every objective: its weights with its config in the "
                    "metadata, for polymodal.pretrain.export.load_exported and `polymodal eval`), and those an "
                    "objective registers: open_clip (clip, siglip: the CLIP model's state dict for "
                    "open_clip.create_model_and_transforms(name, pretrained=FILE)), timm (spark, multimae: the "
                    "pretrained backbone for timm.create_model(name)), standalone (4m: the polymodal file with the "
                    "run's tokenizers inside, for eval, embed and generate without the tokenizer folders). Asking "
                    "for a format the checkpoint's objective does not offer lists the ones it does.",
        epilog="example: polymodal checkpoint export runs/try --format open_clip")
    export.add_argument("run_dir")
    export.add_argument("--tag", help="checkpoint tag, e.g. step_00000100 (default: latest)")
    export.add_argument("--out", help="output file (default: RUN_DIR/<the format's file name>)")
    export.add_argument("--format", default="polymodal", metavar="NAME",
                        help="polymodal, or a format the objective registers (open_clip, timm, standalone)")
    export.set_defaults(func=cmd_checkpoint_export)
    universal = ckpt_commands.add_parser(
        "universal", help="convert a ZeRO checkpoint so it resumes at another world size",
        description="Convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format (beside it, TAG_universal). "
                    "A later resume=latest with a different number of ranks or ZeRO stage loads it. The data "
                    "stream then restarts at the next epoch (its exact position belongs to the old ranks).",
        epilog="example: polymodal checkpoint universal runs/try")
    universal.add_argument("run_dir")
    universal.add_argument("--tag", help="checkpoint tag (default: latest)")
    universal.add_argument("--workers", type=int, default=2, help="conversion processes")
    universal.set_defaults(func=cmd_checkpoint_universal)
