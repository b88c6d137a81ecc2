"""Held-out figures of a trained 4M run, each beside a baseline that needs no learning:

- per-modality cross-entropy of the target tokens on held-out token shards, under the run's own masking (seeded),
  against the unigram baseline: the cross-entropy of the same targets under the training set's target-token
  frequencies (add-one smoothed), which is the best a model without inputs can do per token;
- image -> caption: a greedy caption from the image tokens alone; it counts as right when it contains the sample's
  class name and no other class's name (chance: 1 / classes);
- caption -> image: images generated from "a picture showing a {class}." (MaskGIT and ROAR at several step
  counts), decoded by the image tokenizer and classified by an independent classifier, a softmax regression on
  the standardised pixels of real training images (fitted here; its accuracy on real held-out images, and on
  their tokenizer reconstructions, is reported as the ceiling; chance: 1 / classes);
- with --chain and --psnr-from: chained generation through other modalities and image PSNR from another
  modality's tokens (polymodal/eval/fourm_chained.py).

    python -m polymodal.eval.fourm_heldout runs/4m-tiny-cifar --test SHARDS --test-join TOKSET... \\
        --train SHARDS --train-join TOKSET... --classnames classnames.txt [--batches 20] [--out result.json]
        [--generate maskgit:8 roar:8] [--chain tok_fgmask tok_edges] [--psnr-from tok_edges]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from polymodal.data.config import DataConfig
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement


def loader(objective, shards: str, join: list[str], batch_size: int, extra: list[str] = ()) -> ShardLoader:
    cfg = DataConfig(shards=shards, join=list(join), modalities=list(objective.specs) + list(extra), image_size=None,
                     batch_size=batch_size, num_workers=0, shuffle_buffer=0, shuffle_shards=False, augment=False)
    return ShardLoader(cfg, where=Placement(0, 1))


@torch.no_grad()
def target_labels(objective, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (logits [T, V], labels [T]) of one held-out batch under the objective's masking."""
    inputs, targets, labels = objective.draw_masks(objective.read_batch(batch))
    inputs = {n: t for n, t in inputs.items() if objective.modality_configs[n].input}
    targets = {n: t for n, t in targets.items() if objective.modality_configs[n].target}
    logits = objective.model(inputs, targets, objective.packed)
    return {n: (logits[n], labels[n][targets[n].keep]) for n in logits}


@torch.no_grad()
def unigram_counts(objective, batches) -> dict[str, torch.Tensor]:
    """Each target modality's label frequencies over training batches (masked as in training)."""
    counts = {n: torch.ones(s.vocab_size) for n, s in objective.specs.items()}  # add-one
    for batch in batches:
        _, targets, labels = objective.draw_masks(objective.read_batch(batch))
        for name, tokens in targets.items():
            counts[name] += torch.bincount(labels[name][tokens.keep], minlength=len(counts[name])).float()
    return counts


def held_out_cross_entropy(objective, test_batches, train_batches, seed: int = 0) -> dict:
    """{name: {"cross_entropy", "unigram", "tokens"}} in nats per target token."""
    torch.manual_seed(seed)
    counts = unigram_counts(objective, train_batches)
    log_unigram = {n: (c / c.sum()).log() for n, c in counts.items()}
    torch.manual_seed(seed + 1)
    total = {n: [0.0, 0.0, 0] for n in counts}
    for batch in test_batches:
        for name, (logits, labels) in target_labels(objective, batch).items():
            total[name][0] += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
            total[name][1] += float(-log_unigram[name][labels].sum())
            total[name][2] += labels.numel()
    return {n: {"cross_entropy": ce / max(k, 1), "unigram": uni / max(k, 1), "tokens": k}
            for n, (ce, uni, k) in total.items() if k}


def caption_accuracy(objective, batches, image: str, caption: str, classnames: list[str]) -> dict:
    """Greedy captions from `image` tokens alone; right when the caption names the true class and no other."""
    from polymodal.generate.fourm_generate import FourMGenerator, Sampling
    from polymodal.tokenizers.registry import load

    text = load(objective.modality_configs[caption].tokenizer)
    generator = FourMGenerator(objective, Sampling(temperature=0))
    right = total = 0
    examples = []
    for batch in batches:
        ids, lengths = generator.generate({image: batch[image]}, [caption])[caption]
        for row, n, label in zip(ids, lengths, batch["label"].tolist()):
            words = text.decode([int(i) for i in row[: n - 1]])
            right += named_classes(words, classnames) == [label]
            total += 1
            if len(examples) < 10:
                examples.append({"caption": words, "class": classnames[label]})
    return {"accuracy": right / max(total, 1), "samples": total, "chance": 1 / len(classnames),
            "examples": examples}


def words_of(text: str) -> str:
    """Lower-case words and punctuation marks, one space apart (a WordPiece decode writes "t - shirt / top")."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def named_classes(text: str, classnames: list[str]) -> list[int]:
    """The classes whose name occurs in `text` as whole words, in class order; an occurrence inside a longer
    class name's occurrence does not count (Fashion-MNIST's "shirt" in "t-shirt/top")."""
    text = f" {words_of(text)} "
    spans = [(m.start(), m.end(), i) for i, name in enumerate(classnames)
             for m in re.finditer(re.escape(f" {words_of(name)} "), text)]
    inside = {i for a, b, i in spans for a2, b2, _ in spans if a2 <= a and b <= b2 and b2 - a2 > b - a}
    return sorted({i for _, _, i in spans} - inside)


def pixels(batch) -> torch.Tensor:
    return batch["rgb"].float().flatten(1) / 255


class PixelClassifier:
    """Softmax regression on standardised pixels of real images (C fixed beforehand, not tuned on test data)."""

    def __init__(self, batches, classes: int, C: float = 0.01):
        from polymodal.eval.linear_probe import fit_softmax_regression

        x = torch.cat([pixels(b) for b in batches])
        y = torch.cat([b["label"] for b in batches])
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        self.w, self.b = fit_softmax_regression((x - self.mean) / self.std, y, classes, C)

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        x = (images01.float().flatten(1) - self.mean) / self.std
        return (x @ self.w.T + self.b).argmax(1)


def caption_to_image(objective, classify, classnames: list[str], template: str, schedules: list[str], image: str,
                     caption: str, per_class: int, seed: int, cfg: float = 1.0) -> dict:
    """Share of generated images the classifier assigns to the class their caption names."""
    from polymodal.eval.fourm_chained import decode_images01, sampler

    ids, lengths, truth = caption_prompts(objective, caption, classnames, template, per_class)
    out = {}
    for schedule in schedules:
        tokens = sampler(objective, schedule, seed, cfg).generate({caption: (ids, lengths)}, [image])[image]
        out[schedule] = float((classify(decode_images01(objective, image, tokens)) == truth).float().mean())
    return {"class_consistency": out, "samples": len(truth), "chance": 1 / len(classnames), "template": template,
            "cfg": cfg}


def caption_prompts(objective, caption: str, classnames: list[str], template: str, per_class: int):
    """(ids [B, L], lengths [B], true class [B]): the template for every class, `per_class` times each."""
    from polymodal.tokenizers.registry import load

    text = load(objective.modality_configs[caption].tokenizer)
    captions = [torch.cat([text.encode(template.format(c=c)), torch.tensor([objective.config.eos_id])])
                for c in classnames]
    width = max(len(c) for c in captions)
    ids = torch.stack([torch.nn.functional.pad(c, (0, width - len(c))) for c in captions]).repeat_interleave(
        per_class, 0)
    lengths = torch.tensor([len(c) for c in captions]).repeat_interleave(per_class)
    return ids, lengths, torch.arange(len(classnames)).repeat_interleave(per_class)


def main(argv=None) -> int:
    from polymodal.pretrain.export import load_exported

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run")
    parser.add_argument("--test", required=True, help="held-out source shards")
    parser.add_argument("--test-join", nargs="+", required=True, help="their token sets")
    parser.add_argument("--train", required=True, help="training source shards (for the unigram baseline)")
    parser.add_argument("--train-join", nargs="+", required=True)
    parser.add_argument("--classnames", help="classnames.txt: also caption images and score the class named")
    parser.add_argument("--image", default="tok_rgb")
    parser.add_argument("--caption", default="tok_caption")
    parser.add_argument("--batches", type=int, default=20, help="batches of 100 from each set (default 20)")
    parser.add_argument("--generate", nargs="*", default=[], metavar="SCHEDULE",
                        help="also caption -> image at these schedules (e.g. maskgit:8 roar:16); needs --classnames "
                             "and rgb in the source shards")
    parser.add_argument("--template", default="a picture showing a {c}.")
    parser.add_argument("--per-class", type=int, default=20, help="generated images per class (default 20)")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale of caption -> image and the chain (default 1: none)")
    parser.add_argument("--chain", nargs="*", default=[], metavar="MODALITY",
                        help="also caption -> these modalities in turn -> image, against caption -> image (e.g. "
                             "tok_fgmask tok_edges); needs --classnames")
    parser.add_argument("--chain-schedule", default="maskgit:8", help="schedule of the chained generation")
    parser.add_argument("--psnr-from", metavar="MODALITY",
                        help="also the image from this modality's held-out tokens (e.g. tok_edges), PSNR against "
                             "the real image and the mean training image")
    parser.add_argument("--psnr-schedule", default="maskgit:8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args(argv)
    if (args.generate or args.chain) and not args.classnames:
        parser.error("--generate and --chain need --classnames")
    run = Path(args.run)
    objective = load_exported(run / "model.safetensors" if run.is_dir() else run)
    extra = (["label"] if args.classnames else []) + (["rgb"] if args.psnr_from else [])

    def take(shards, join):
        batches = []
        for batch in loader(objective, shards, join, 100, extra):
            batches.append(batch)
            if len(batches) == args.batches:
                break
        return batches

    test, train = take(args.test, args.test_join), take(args.train, args.train_join)
    result = {"run": str(run), "test_samples": sum(len(b["__key__"]) for b in test),
              "cross_entropy": held_out_cross_entropy(objective, test, train, args.seed)}
    for figures in result["cross_entropy"].values():
        figures["bits_saved_per_token"] = (figures["unigram"] - figures["cross_entropy"]) / math.log(2)
    if args.classnames:
        classnames = Path(args.classnames).read_text().splitlines()
        result["image_to_caption"] = caption_accuracy(objective, test, args.image, args.caption, classnames)
    if args.generate or args.chain or args.psnr_from:
        generation_figures(objective, args, classnames if args.classnames else [], test, result)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def real_images(shards: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, size, size], labels [N]): the first `count` samples of `shards`, centre-cropped."""
    cfg = DataConfig(shards=shards, modalities=["rgb", "label"], image_size=size, batch_size=500, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, augment=False)
    batches = []
    for batch in ShardLoader(cfg, where=Placement(0, 1)):
        batches.append(batch)
        if len(batches) * 500 >= count:
            break
    return torch.cat([b["rgb"] for b in batches]), torch.cat([b["label"] for b in batches])


def generation_figures(objective, args, classnames: list[str], test_batches, result: dict) -> None:
    """Fit the pixel classifier on real training images, check it on real held-out ones and on their tokenizer
    reconstructions, then score images generated from captions (and through chains, and from --psnr-from)."""
    from polymodal.eval import fourm_chained
    from polymodal.tokenizers.registry import load_image_tokenizer

    tokenizer, size = load_image_tokenizer(objective.modality_configs[args.image].tokenizer)
    size = size or 32
    train_images, train_labels = real_images(args.train, 10000, size)
    if args.psnr_from:
        mean_image = train_images.float().mean(0, keepdim=True) / 255
        result["image_from"] = fourm_chained.image_from(objective, test_batches, args.psnr_from, args.image,
                                                        mean_image, args.psnr_schedule, args.seed)
    if not (args.generate or args.chain):
        return
    classify = PixelClassifier([{"rgb": train_images, "label": train_labels}], len(classnames))
    images, labels = real_images(args.test, 2000, size)
    with torch.no_grad():
        rebuilt = (tokenizer.tokenizer_model.decode(tokenizer.tokenizer_model.encode(
            tokenizer.inputs({"rgb": images}))).float().clamp(-1, 1) + 1) / 2
    judge = {"classifier": f"softmax regression on standardised pixels of {len(train_images)} real training "
                           "images, C=0.01",
             "real_test_accuracy": float((classify(images.float() / 255) == labels).float().mean()),
             "reconstructed_test_accuracy": float((classify(rebuilt) == labels).float().mean())}
    if args.generate:
        result["caption_to_image"] = {**judge, **caption_to_image(
            objective, classify, classnames, args.template, args.generate, args.image, args.caption,
            args.per_class, args.seed, args.cfg)}
    if args.chain:
        ids, lengths, truth = caption_prompts(objective, args.caption, classnames, args.template, args.per_class)
        result["chained"] = {**judge, **fourm_chained.chained_vs_direct(
            objective, classify, (ids, lengths), truth, args.chain_schedule, args.image, args.caption, args.chain,
            args.seed, args.cfg)}


if __name__ == "__main__":
    raise SystemExit(main())
