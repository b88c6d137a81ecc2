"""`polymodal predict` (MultiMAE: fill target modalities from given ones, one PNG) and `polymodal generate` (4M:
generate target modalities from conditions, chained, as PNG grids and text)."""

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


def cmd_generate(args: argparse.Namespace) -> int:
    from polymodal.generate.fourm_files import generate_to_files
    from polymodal.generate.fourm_generate import Sampling, Schedule

    conditions = {}
    for item in args.condition:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--condition {item!r}: write it as NAME=VALUE, e.g. caption=\"a red apple\" or "
                              "rgb=photo.png")
        conditions[name] = value
    targets = [t for group in args.target for t in group.split(",") if t]
    sampling = Sampling(args.temperature, args.temperature_schedule, args.top_k, args.top_p, args.cfg)
    result = generate_to_files(args.run, conditions, targets, args.out, sampling, Schedule.parse(args.schedule),
                               args.samples, args.seed)
    print(json.dumps({k: result[k] for k in ("targets", "texts", "grid") if k in result}))
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

    g = commands.add_parser("generate", help="generate modalities from others with a trained 4M (PNG grid + text)",
                            description="Any-to-any generation with a trained 4m run. Each --target is generated "
                                        "in order from the --condition modalities and the targets before it "
                                        "(chained: caption -> edges -> rgb). Image-like targets decode by MaskGIT "
                                        "or ROAR steps (--schedule), sequences token by token with a KV cache. "
                                        "Conditions are tokenized, and results decoded, with the tokenizers the "
                                        "run's config names. Writes OUT/generated.png (image conditions, then "
                                        "generated images; one row per sample) and OUT/generated.json (texts).",
                            epilog='example: polymodal generate runs/4m-tiny --condition caption="a red apple" '
                                   "--target edges,rgb --schedule roar:16 --cfg 3 --samples 4 --out out/apple")
    g.add_argument("run", help="a 4m run folder (its model.safetensors) or an exported .safetensors file")
    g.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a given modality: text for sequences (caption=...), an image file or a .npy of token ids "
                        "for image-like ones; NAME with or without its tok_ prefix; repeatable (none: unconditional)")
    g.add_argument("--target", action="append", required=True, metavar="NAMES",
                   help="modalities to generate, comma-separated, in order; repeatable")
    g.add_argument("--schedule", default="maskgit:8", help="image tokens: maskgit:STEPS or roar:STEPS (default "
                                                            "maskgit:8)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (default 1)")
    g.add_argument("--temperature-schedule", default="constant", choices=["constant", "linear"],
                   help="linear: from --temperature down to 0 over the steps")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=0.0, help="sample within the top-p nucleus (0: off)")
    g.add_argument("--cfg", type=float, default=1.0,
                   help="classifier-free guidance scale (1: none; needs a run trained with condition_dropout)")
    g.add_argument("--samples", type=int, default=4, help="rows to generate for the same conditions (default 4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="generated", help="output folder (default: generated)")
    g.set_defaults(func=cmd_generate)
