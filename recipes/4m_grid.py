"""The README's picture of a trained 4M: one row per class, its caption written at the left, then for each of
SAMPLES draws the chained generation caption -> MODALITY... (each picture in turn) beside the image generated from
the caption directly. Class maps are painted with a fixed palette (background black).

    python recipes/4m_grid.py RUN CLASSNAMES OUT.png --chain tok_fgmask tok_edges [--samples 2] [--schedule maskgit:8]
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from polymodal.eval.fourm_chained import sampler
from polymodal.eval.fourm_heldout import caption_prompts
from polymodal.generate.fourm_files import decode_images, tokenizer_of
from polymodal.pretrain.export import load_exported

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], dtype=np.uint8)


def pictures(objective, name, ids):
    tokenizer = tokenizer_of(objective, name)
    if getattr(tokenizer, "classes", 0):
        with torch.no_grad():
            classes = tokenizer.decode(ids).numpy()
        return PALETTE[classes % len(PALETTE)]
    return decode_images(objective, name, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("classnames")
    parser.add_argument("out")
    parser.add_argument("--chain", nargs="*", default=[])
    parser.add_argument("--image", default="tok_rgb")
    parser.add_argument("--caption", default="tok_caption")
    parser.add_argument("--template", default="a picture showing a {c}.")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--schedule", default="maskgit:8")
    parser.add_argument("--size", type=int, default=56, help="tile side in pixels")
    args = parser.parse_args()
    run = Path(args.run)
    objective = load_exported(run / "model.safetensors" if run.is_dir() else run)
    names = Path(args.classnames).read_text().splitlines()
    ids, lengths, _ = caption_prompts(objective, args.caption, names, args.template, args.samples)

    def draw(targets):
        return sampler(objective, args.schedule, 0).generate({args.caption: (ids, lengths)}, targets)

    chained, direct = draw([*args.chain, args.image]), draw([args.image])
    columns = [pictures(objective, n, chained[n]) for n in [*args.chain, args.image]]
    columns.append(pictures(objective, args.image, direct[args.image]))
    label_width, size, gap = 160, args.size, 2
    per_sample = len(columns) * (size + gap) + 6
    canvas = Image.new("RGB", (label_width + args.samples * per_sample, 14 + len(names) * (size + gap)), "white")
    ink = ImageDraw.Draw(canvas)
    heads = [n.removeprefix("tok_") for n in [*args.chain, args.image]] + ["direct"]
    ink.text((4, 0), args.template.format(c="{class}"), fill="black")
    for s in range(args.samples):
        for c, head in enumerate(heads):
            ink.text((label_width + s * per_sample + c * (size + gap) + 2, 0), head, fill="black")
    for r, name in enumerate(names):
        top = 14 + r * (size + gap)
        ink.text((4, top + size // 2 - 6), name, fill="black")
        for s in range(args.samples):
            row = r * args.samples + s
            for c, column in enumerate(columns):
                tile = Image.fromarray(column[row]).resize((size, size), Image.NEAREST)
                canvas.paste(tile, (label_width + s * per_sample + c * (size + gap), top))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
