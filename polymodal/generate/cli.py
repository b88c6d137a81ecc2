"""`polymodal predict`: fill target modalities of a trained run from given ones, written as a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polymodal.data.errors import ConfigError


def cmd_predict(args: argparse.Namespace) -> int:
    from polymodal.pretrain.export import exported_metadata, load_exported

    run = Path(args.run)
    weights = run / "model.safetensors" if run.is_dir() else run
    if not weights.is_file():
        raise ConfigError(f"{args.run}: no {weights} (a run folder with model.safetensors, or an exported file)")
    given = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--input {item!r}: write it as NAME=FILE, e.g. edges=edges.png")
        if not Path(path).is_file():
            raise ConfigError(f"--input {item!r}: no file {path}")
        given[name] = Path(path)
    objective = load_exported(weights)
    size = args.image_size or int(exported_metadata(weights).get("polymodal.image_size", 0))
    if not size:
        raise ConfigError(f"{weights} does not record its training image size: give --image-size")
    out = objective.predict_files(given, args.target, Path(args.output), size)
    print(json.dumps({"output": str(out), "inputs": sorted(given), "targets": args.target}))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="fill target modalities of a trained model from given ones (a PNG)",
                            description="Cross-modal prediction with a trained masked multimodal model (objective "
                                        "multimae): every token of the --input modalities is visible, the "
                                        "--target modalities are decoded from mask tokens. Writes one PNG: each "
                                        "input, then each prediction (class maps coloured per class).",
                            epilog="example: polymodal predict runs/multimae-fmnist --input edges=edges.png "
                                   "--target grey --target semseg -o prediction.png")
    p.add_argument("run", help="a run folder (its model.safetensors) or an exported .safetensors file")
    p.add_argument("--input", action="append", required=True, metavar="NAME=FILE",
                   help="a given modality and its image file (PNG/JPEG; class maps hold class ids); repeatable")
    p.add_argument("--target", action="append", required=True, metavar="NAME", help="a modality to fill; repeatable")
    p.add_argument("-o", "--output", default="prediction.png", help="the PNG to write (default: prediction.png)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize inputs to this size (default: the run's training size)")
    p.set_defaults(func=cmd_predict)
