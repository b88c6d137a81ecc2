"""LiT ablation on validation splits carved from the training sources (issue 15): which head, resolution, text
side and optimiser settings to ship in configs/align-mixed.yaml, chosen without looking at any test set.

Both towers are frozen in eval mode (EfficientNet-Lite0, all-MiniLM-L6-v2), so each variant trains on cached
features in seconds; this is why it is a separate script and not N runs of `polymodal pretrain` (the shipped configs
then reproduce the winner and the baseline end to end, on the test sets).

Validation data, none of it used to train:
  - emoji: the last 300 of the 1,500 training emoji pairs (demo shards 0..2) — text<->image R@1 over 300 pairs;
  - CIFAR-10 / Fashion-MNIST: training images 2,000..3,999 (the mixed set trains on the first 2,000), zero-shot
    with the 12 default templates.

    python benchmarks/lit_ablation.py features --mixed data-out/mixed   # once: ~25 min on 2 CPU cores
    python benchmarks/lit_ablation.py train --seeds 0 1                 # every variant, JSON lines + a table

Variants (the issue's suspects): linear map at 128 and 224 px, an MLP head, the least-squares initialisation,
a learned text projection, the initial temperature, weight decay, twice the steps, MiniLM's last layer trained at
three learning rates; then (224 px) pooled features of every stage concatenated ("multistage"), a wider head with
dropout, emoji pairs drawn 7x as often as the others ("emoji7"), and all of these together ("recipe224").
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "polymodal" / "demo_data" / "train"
FMNIST_NAMES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
VAL_EMOJI = 300


def _towers():
    from polymodal.pretrain.objectives import build_objective
    torch.manual_seed(0)
    return build_objective({"name": "align", "image_tower": "efficientnet-lite0", "pretrained_image": True,
                            "text_tower": "all-minilm-l6-v2", "pretrained_text": True, "embed_dim": 384,
                            "text_projection": "identity", "lock_image": True, "lock_text": True,
                            "context_length": 32, "image_pool": "stages"}).eval()


CROP_SCALE = [0.4, 1.0]  # the augmented view: a random-resized crop of at least 40% of the picture, and a flip


def _loader(shards, modalities, size, augment=False):
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement
    cfg = DataConfig(shards=shards, modalities=modalities, batch_size=128, num_workers=1, shuffle_buffer=0,
                     shuffle_shards=False, image_size=size, augment=augment, crop_scale=CROP_SCALE)
    return ShardLoader(cfg, where=Placement(0, 1))


def _text_states(obj, tokens):
    """MiniLM's input to its last layer (fp16, for the last-layer variant), the mask, and the mean-pooled output."""
    mask = (tokens != obj.model.text.pad_id).long()
    out = obj.model.text.net(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
    w = mask.unsqueeze(-1).float()
    return out.hidden_states[-2].half(), mask, (out.last_hidden_state * w).sum(1) / w.sum(1)


@torch.no_grad()
def _images(obj, shards, size, modalities=("rgb",), augment=False):
    """Pooled head features, pooled features of each stage (the tower's image_pool='stages' output, split), keys."""
    tower = obj.model.image
    stage_width = sum(tower.stage_widths())
    pooled, ids, labels, captions = [], [], [], []
    for b in _loader(shards, list(modalities), size, augment):
        pooled.append(tower(obj.normalize_images(b["rgb"])))
        ids += [f"{u}#{k}" for u, k in zip(b["__url__"], b["__key__"])]
        labels += list(b.get("label", []))
        captions += list(b.get("caption", []))
    pooled = torch.cat(pooled)
    return {"image": pooled[:, stage_width:], "multi": pooled[:, :stage_width], "ids": ids,
            "label": torch.tensor(labels) if labels else None, "captions": captions}


def features(args) -> None:
    out = Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    mixed, data = Path(args.mixed), Path(args.data_root)
    for name, source, extra in (("cifar-val", data / "cifar10" / "train.tar.gz", []),
                                ("fmnist-val", data / "fashion-mnist" / "train-images-idx3-ubyte.gz",
                                 ["--classnames", FMNIST_NAMES])):
        if not (out / name / "3.tar").exists():
            subprocess.run([sys.executable, "-m", "polymodal", "data", "shards", str(source), str(out / name),
                            "--limit", "4000", "--samples-per-shard", "1000", "--overwrite", "-q", *extra], check=True)
    obj = _towers()
    tokenize = obj.tokenizer()
    train_shards = [f"{DEMO}/{{0..2}}.tar.gz", f"{mixed}/imagenet/{{0..3}}.tar", f"{mixed}/cifar10-pairs/{{0..7}}.tar",
                    f"{mixed}/fmnist-pairs/{{0..7}}.tar"]
    if args.augmented_view:  # one augmented view of every training image at 224 px (the crop-augmentation rows)
        t0 = time.time()
        view = _images(obj, train_shards, 224, ("rgb", "caption"), augment=True)
        torch.save({"image": view["image"], "multi": view["multi"], "ids": view["ids"]}, out / "train-224-aug.pt")
        print(f"an augmented view of {len(view['ids'])} training images: {time.time() - t0:.0f} s", flush=True)
        return
    for size in (128, 224):
        t0 = time.time()
        train = _images(obj, train_shards, size, ("rgb", "caption"))
        with torch.no_grad():
            states = [_text_states(obj, torch.stack([tokenize(c) for c in train["captions"][i:i + 256]]))
                      for i in range(0, len(train["ids"]), 256)]
        hidden, mask, text = (torch.cat(parts) for parts in zip(*states))
        torch.save({"image": train["image"], "multi": train["multi"], "text": text, "hidden": hidden, "mask": mask,
                    "ids": train["ids"]}, out / f"train-{size}.pt")
        for name in ("cifar-val", "fmnist-val"):
            val = _images(obj, f"{out}/{name}/{{2..3}}.tar", size, ("rgb", "label"))
            classes = (out / name / "classnames.txt").read_text().split("\n")[:10]
            templates = [t for t in (out / name / "zeroshot_classification_templates.txt").read_text().split("\n")
                         if t]
            with torch.no_grad():
                hid, m, _ = _text_states(obj, torch.stack([tokenize(t.replace("{c}", c))
                                                           for c in classes for t in templates]))
            torch.save({"image": val["image"], "multi": val["multi"], "label": val["label"], "hidden": hid,
                        "mask": m, "classes": len(classes), "templates": len(templates)}, out / f"{name}-{size}.pt")
        print(f"features at {size} px: {len(train['ids'])} training pairs, {time.time() - t0:.0f} s", flush=True)


VARIANTS = {  # name: (image size, head, options)
    "linear128": (128, "linear", {}),
    "linear224": (224, "linear", {}),
    "mlp224": (224, "mlp", {}),
    "lsq-init224": (224, "lsq", {}),
    "text-proj224": (224, "linear", {"text_proj": True}),
    "temp0.03-224": (224, "linear", {"temp": 0.03}),
    "wd0.1-224": (224, "linear", {"wd": 0.1}),
    "600steps224": (224, "linear", {"steps": 600}),
    "multistage-mlp224": (224, "multistage", {}),
    "multistage-w2048-dropout224": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3)}),
    "emoji7-linear224": (224, "linear", {"emoji_weight": 7}),
    "emoji7-multistage224": (224, "multistage", {"emoji_weight": 7}),
    # configs/align-mixed.yaml: all of the above, twice the steps; then with an augmented view (features --augmented-view)
    # in place of the plain one for half of each batch's images.
    "recipe224-crop-aug": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7, "steps": 600,
                                               "augmented": True}),
    "recipe224": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7, "steps": 600}),
    "last-layer-1e-5": (224, "linear", {"text_lr": 1e-5}),
    "last-layer-3e-5": (224, "linear", {"text_lr": 3e-5}),
    "last-layer-1e-4": (224, "linear", {"text_lr": 1e-4}),
}


class Head(nn.Module):
    def __init__(self, kind: str, width_in: int, opts: dict, last_layer: nn.Module | None, train_x, train_t):
        super().__init__()
        if kind in ("mlp", "multistage"):
            width, (p_in, p_hidden) = opts.get("width", 1024), opts.get("dropout", (0.0, 0.0))
            self.image = nn.Sequential(nn.Dropout(p_in), nn.Linear(width_in, width), nn.GELU(), nn.Dropout(p_hidden),
                                       nn.Linear(width, 384))
        else:
            self.image = nn.Linear(width_in, 384, bias=False)
        if kind == "lsq":  # ridge least-squares map from image to text features (suspect 4)
            x, t = train_x.float(), train_t.float()
            ridge = 1e-2 * x.pow(2).sum(1).mean()
            with torch.no_grad():
                self.image.weight.copy_(torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ t).T)
        self.text = nn.Linear(384, 384, bias=False) if opts.get("text_proj") else None
        if self.text is not None:
            nn.init.eye_(self.text.weight)
        self.last_layer = last_layer
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / opts.get("temp", 0.07))))


def _pool_last_layer(layer, hidden, mask):
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # BERT's padding mask
    out = layer(hidden.float(), attention_mask=additive)
    out = out[0] if isinstance(out, tuple) else out
    w = mask.unsqueeze(-1).float()
    return (out * w).sum(1) / w.sum(1)


def train(args) -> None:
    import copy
    cache = Path(args.cache)
    load = functools.lru_cache(maxsize=None)(lambda name: torch.load(cache / name))  # each file read once
    rows = []
    bert = _towers().model.text.net
    for seed in args.seeds:
        for name in args.variants or list(VARIANTS):
            size, kind, opts = VARIANTS[name]
            tr = load(f"train-{size}.pt")
            emoji = [i for i, x in enumerate(tr["ids"]) if "demo_data" in x]
            val_emoji = torch.tensor(emoji[-VAL_EMOJI:])
            held = set(val_emoji.tolist())
            train_idx = torch.tensor([i for i in range(len(tr["ids"])) if i not in held])
            x_all = torch.cat([tr["multi"], tr["image"]], 1) if kind == "multistage" else tr["image"]
            x_aug = None
            if opts.get("augmented"):
                aug = load("train-224-aug.pt")
                assert aug["ids"] == tr["ids"], "the augmented view lists other samples: rerun features"
                x_aug = torch.cat([aug["multi"], aug["image"]], 1)
            torch.manual_seed(seed)
            last = copy.deepcopy(bert.encoder.layer[-1]).requires_grad_(True) if "text_lr" in opts else None
            head = Head(kind, x_all.shape[1], opts, last, x_all[train_idx], tr["text"][train_idx])

            def embed_text(hidden, mask, pooled=None):
                if head.last_layer is not None or pooled is None:
                    with torch.set_grad_enabled(head.last_layer is not None and torch.is_grad_enabled()):
                        pooled = _pool_last_layer(head.last_layer or bert.encoder.layer[-1], hidden, mask)
                return F.normalize(head.text(pooled) if head.text is not None else pooled, dim=-1)

            steps = opts.get("steps", 300)
            main = [p for n, p in head.named_parameters() if not n.startswith("last_layer.")]
            groups = [{"params": main, "lr": 1e-3}]
            if last is not None:
                groups.append({"params": list(last.parameters()), "lr": opts["text_lr"]})
            # Emoji pairs drawn emoji_weight times as often as the others (data.shard_weights in the recipe).
            weight = torch.tensor([opts.get("emoji_weight", 1.0) if "demo_data" in tr["ids"][i] else 1.0
                                   for i in train_idx.tolist()])
            opt = torch.optim.AdamW(groups, weight_decay=opts.get("wd", 0.0), betas=(0.9, 0.98), eps=1e-6)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10 if s < 10 else
                                                      0.5 * (1 + math.cos(math.pi * (s - 10) / (steps - 10))))
            t0 = time.time()
            head.image.train()  # dropout (only the image head has any)
            for _ in range(steps):
                draw = (torch.multinomial(weight, 256, replacement=True) if "emoji_weight" in opts
                        else torch.randint(len(train_idx), (256,)))
                b = torch.unique(train_idx[draw])  # no sample twice in a batch
                mask = tr["mask"][b]
                used = int(mask.any(0).nonzero().max()) + 1
                t = embed_text(tr["hidden"][b][:, :used], mask[:, :used], None if last is not None else tr["text"][b])
                x = x_all[b]
                if x_aug is not None:  # each image: its plain or its augmented view, even odds
                    x = torch.where(torch.rand(len(b), 1) < 0.5, x_aug[b], x)
                i = F.normalize(head.image(x), dim=-1)
                logits = head.log_scale.clamp(max=math.log(100)).exp() * i @ t.T
                y = torch.arange(len(b))
                loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            seconds = time.time() - t0
            head.image.eval()
            with torch.no_grad():
                mask = tr["mask"][val_emoji]
                used = int(mask.any(0).nonzero().max()) + 1
                t = embed_text(tr["hidden"][val_emoji][:, :used], mask[:, :used],
                               None if last is not None else tr["text"][val_emoji])
                sim = F.normalize(head.image(x_all[val_emoji]), dim=-1) @ t.T
                truth = torch.arange(len(val_emoji))
                row = {"variant": name, "seed": seed, "train_s": round(seconds, 1),
                       "emoji_i2t_r1": round(float((sim.argmax(1) == truth).float().mean()), 4),
                       "emoji_t2i_r1": round(float((sim.argmax(0) == truth).float().mean()), 4)}
                for val in ("cifar", "fmnist"):
                    d = load(f"{val}-val-{size}.pt")
                    used = int(d["mask"].any(0).nonzero().max()) + 1
                    prompts = embed_text(d["hidden"][:, :used], d["mask"][:, :used])
                    classes = F.normalize(prompts.view(d["classes"], d["templates"], -1).mean(1), dim=-1)
                    x = torch.cat([d["multi"], d["image"]], 1) if kind == "multistage" else d["image"]
                    pred = (F.normalize(head.image(x), dim=-1) @ classes.T).argmax(1)
                    row[f"{val}_zeroshot"] = round(float((pred == d["label"]).float().mean()), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| variant | emoji i->t R@1 | emoji t->i R@1 | CIFAR-10 | F-MNIST | train s |\n|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cell = lambda key: " / ".join(f"{100 * r[key]:.1f}" for r in mine)  # noqa: E731
        print(f"| {name} | {cell('emoji_i2t_r1')} | {cell('emoji_t2i_r1')} | {cell('cifar_zeroshot')} | "
              f"{cell('fmnist_zeroshot')} | {' / '.join(str(r['train_s']) for r in mine)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/lit-ablation", help="where features and validation shards go")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features", help="build validation splits and cache frozen-tower features (once)")
    f.add_argument("--mixed", default="data-out/mixed", help="recipes/mixed-pairs.sh's output folder")
    f.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    f.add_argument("--augmented-view", action="store_true",
                   help="instead: one augmented view of every training image at 224 px (for the crop-aug variant)")
    t = sub.add_parser("train", help="train every variant on the cached features, print JSON lines and a table")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    t.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    features(args) if args.command == "features" else train(args)


if __name__ == "__main__":
    main()
