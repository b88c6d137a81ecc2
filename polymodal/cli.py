"""The `polymodal` command line: wires the subcommands each part of the package defines."""

from __future__ import annotations

import argparse
import logging
import sys

from polymodal.data.errors import ConfigError
from polymodal.pretrain import TrainingAborted

log = logging.getLogger("polymodal")


def build_parser() -> argparse.ArgumentParser:
    from polymodal.data import cli as data_cli
    from polymodal.embed import cli as embed_cli
    from polymodal import info
    from polymodal.eval import cli as eval_cli
    from polymodal.generate import cli as generate_cli
    from polymodal.pretrain import cli as pretrain_cli
    from polymodal.tokenizers import cli as tokenizer_cli

    parser = argparse.ArgumentParser(
        prog="polymodal", description="Pretrain and evaluate multimodal foundation models on WebDataset shards.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.add_commands(commands)
    pretrain_cli.add_commands(commands)
    eval_cli.add_commands(commands)
    embed_cli.add_commands(commands)
    generate_cli.add_commands(commands)
    tokenizer_cli.add_commands(commands)
    info.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Other libraries (open_clip, DeepSpeed) log chattily at INFO on the root logger: only warnings from them.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"polymodal: error: {exc}", file=sys.stderr)
        return 2
    except TrainingAborted as exc:
        print(f"polymodal: training aborted: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("polymodal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
