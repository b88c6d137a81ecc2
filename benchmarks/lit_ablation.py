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
dropout, emoji pairs drawn 7x as often as the others ("emoji7"), and all of these together ("recipe224"); then the
recipe with the image tower's last stage trained on cached inputs to it (`features --sizes 224 --stage-maps` first),
with more captions per emoji pair from its own metadata, as an ensemble of four heads, with batches of 1,024, with
the emoji pairs drawn 15x as often, and with SigLIP's sigmoid loss.
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


def _towers(unlocked_groups: int = 0):
    from polymodal.pretrain.objectives import build_objective
    torch.manual_seed(0)
    return build_objective({"name": "align", "image_tower": "efficientnet-lite0", "pretrained_image": True,
                            "text_tower": "all-minilm-l6-v2", "pretrained_text": True, "embed_dim": 384,
                            "text_projection": "identity", "lock_image": True, "lock_text": True,
                            "lock_image_unlocked_groups": unlocked_groups, "context_length": 32,
                            "image_pool": "stages"}).eval()


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
def _images(obj, shards, size, modalities=("rgb",), augment=False, maps=False):
    """Pooled head features, pooled features of each stage (the tower's image_pool='stages' output, split), keys;
    with `maps`, also the input to the last stage (fp16 maps), for the variants that train that stage."""
    tower = obj.model.image
    stage_width = sum(tower.stage_widths())
    pooled, ids, labels, captions, taps = [], [], [], [], []
    hook = (tower.net._blocks[tower._stage_ends()[-2]].register_forward_hook(
        lambda _m, _a, out: taps.append(out.half())) if maps else None)
    for b in _loader(shards, list(modalities), size, augment):
        pooled.append(tower(obj.normalize_images(b["rgb"])))
        ids += [f"{u}#{k}" for u, k in zip(b["__url__"], b["__key__"])]
        labels += list(b.get("label", []))
        captions += list(b.get("caption", []))
    if hook is not None:
        hook.remove()
    pooled = torch.cat(pooled)
    return {"image": pooled[:, stage_width:], "multi": pooled[:, :stage_width], "ids": ids,
            "label": torch.tensor(labels) if labels else None, "captions": captions,
            "maps": torch.cat(taps) if taps else None}


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
    for size in args.sizes:
        t0 = time.time()
        train = _images(obj, train_shards, size, ("rgb", "caption"), maps=args.stage_maps)
        if args.stage_maps:
            torch.save({"maps": train["maps"], "ids": train["ids"]}, out / f"train-{size}-maps.pt")
        with torch.no_grad():
            states = [_text_states(obj, torch.stack([tokenize(c) for c in train["captions"][i:i + 256]]))
                      for i in range(0, len(train["ids"]), 256)]
        hidden, mask, text = (torch.cat(parts) for parts in zip(*states))
        torch.save({"image": train["image"], "multi": train["multi"], "text": text, "hidden": hidden, "mask": mask,
                    "ids": train["ids"]}, out / f"train-{size}.pt")
        for name in ("cifar-val", "fmnist-val"):
            val = _images(obj, f"{out}/{name}/{{2..3}}.tar", size, ("rgb", "label"), maps=args.stage_maps)
            if args.stage_maps:
                torch.save({"maps": val["maps"]}, out / f"{name}-{size}-maps.pt")
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
    # The image tower's last stage (its last block, head conv and head norm: lock_image_unlocked_groups=3, norms
    # in training mode as the engine runs them) trained on cached inputs to that stage, at the given learning rate;
    # the rest as recipe224.
    "recipe224-last-stage-1e-4": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                                      "steps": 600, "last_stage_lr": 1e-4}),
    "recipe224-last-stage-1e-5": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                                      "steps": 600, "last_stage_lr": 1e-5}),
    # Each training emoji pair's caption is, half the time, one of three others made from its own metadata (its
    # name with its keywords, the keywords alone, its short names with its subcategory); the rest as recipe224.
    "recipe224-caption-variants": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                                       "steps": 600, "caption_variants": 0.5}),
    # Four recipe224 heads from different initialisations, each with its own loss on the same batches; evaluated on
    # the mean of their (unnormalised) outputs, which is one head four times as wide.
    "recipe224-ensemble4": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                                "steps": 600, "ensemble": 4}),
    # The head also sees where things are: the head features pooled over a 2x2 grid of the 7x7 map (from the cached
    # maps through the frozen last stage), after the recipe's input.
    "recipe224-grid2": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7, "steps": 600,
                                            "grid": 2}),
    # Larger batches (more emoji negatives in each: hard negatives for the retrieval task), emoji drawn more often,
    # and SigLIP's pairwise sigmoid loss in place of InfoNCE; the rest as recipe224.
    "recipe224-batch1024": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                                "steps": 600, "batch": 1024}),
    "recipe224-emoji15": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 15,
                                              "steps": 600}),
    "recipe224-siglip": (224, "multistage", {"width": 2048, "dropout": (0.2, 0.3), "emoji_weight": 7,
                                             "steps": 600, "siglip": True}),
    "last-layer-1e-5": (224, "linear", {"text_lr": 1e-5}),
    "last-layer-3e-5": (224, "linear", {"text_lr": 3e-5}),
    "last-layer-1e-4": (224, "linear", {"text_lr": 1e-4}),
}


class LastStage(nn.Module):
    """A trainable copy of EfficientNet-Lite0's last stage (from a tower locked with its last 3 groups unlocked: the
    last block, then the head conv and norm); returns that block's pooled output and the pooled head features (the
    last two parts of image_pool='stages')."""

    def __init__(self, net: nn.Module):
        super().__init__()
        import copy
        self.block, self.conv_head, self.norm = (copy.deepcopy(m) for m in (net._blocks[-1], net._conv_head, net._bn1))
        self.act = net._swish
        self.requires_grad_(True)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.block(maps.float())
        return torch.cat([x.mean(dim=(2, 3)), self.act(self.norm(self.conv_head(x))).mean(dim=(2, 3))], 1)


class Ensemble(nn.ModuleList):
    """Heads trained side by side, each with its own loss (training: [K, B, D]); evaluated on their mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([member(x) for member in self])
        return out if self.training else out.mean(0)


class Head(nn.Module):
    def __init__(self, kind: str, width_in: int, opts: dict, last_layer: nn.Module | None, train_x, train_t):
        super().__init__()
        if kind in ("mlp", "multistage"):
            width, (p_in, p_hidden) = opts.get("width", 1024), opts.get("dropout", (0.0, 0.0))
            mlp = lambda: nn.Sequential(nn.Dropout(p_in), nn.Linear(width_in, width), nn.GELU(),  # noqa: E731
                                        nn.Dropout(p_hidden), nn.Linear(width, 384))
            self.image = Ensemble([mlp() for _ in range(opts["ensemble"])]) if "ensemble" in opts else mlp()
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
        # SigLIP's initialisation: temperature 10, bias -10 (few positives per row).
        temperature = 10.0 if opts.get("siglip") else 1 / opts.get("temp", 0.07)
        self.log_scale = nn.Parameter(torch.tensor(math.log(temperature)))
        self.bias = nn.Parameter(torch.tensor(-10.0)) if opts.get("siglip") else None


@torch.no_grad()
def grid_features(net: nn.Module, maps: torch.Tensor, grid: int) -> torch.Tensor:
    """The frozen tower's head features (from the cached inputs to its last stage), mean-pooled over a grid x grid
    layout of the map instead of the whole of it."""
    stage = LastStage(net).eval()  # a copy already
    out = []
    for chunk in maps.split(500):
        x = stage.block(chunk.float())
        x = stage.act(stage.norm(stage.conv_head(x)))
        out.append(F.adaptive_avg_pool2d(x, grid).flatten(1))
    return torch.cat(out)


def caption_variants(meta: dict) -> list[str]:
    """Other captions of an emoji pair from its own metadata (the demo shards' .json): name and keywords,
    keywords alone, short names and subcategory."""
    words = lambda items: list(dict.fromkeys(w.replace("_", " ").replace("-", " ").strip() for w in items))  # noqa: E731
    name = meta["name"]
    keywords = [w for w in words(meta.get("keywords", [])) if w and w != name]
    short = [w for w in words(meta.get("short_names", [])) if w]
    out = []
    if keywords:
        out += [f"{name}, {', '.join(keywords)}", ", ".join(keywords)]
    if short:
        out.append(f"{', '.join(short)} ({meta.get('subcategory', '').replace('-', ' ')})")
    return out


def _shard_json(ids: list[str]) -> dict[str, dict]:
    """The .json member of each `url#key` sample of gzipped demo shards."""
    import tarfile
    found = {}
    for url in dict.fromkeys(i.split("#")[0] for i in ids if "demo_data" in i):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    found[f"{url}#{member.name[:-5]}"] = json.loads(tar.extractfile(member).read())
    return found


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
    towers = _towers()
    bert = towers.model.text.net
    image_net = _towers(unlocked_groups=3).model.image.net
    fixed_width = sum(towers.model.image.stage_widths()[:-1])  # pooled stages before the last one
    for seed in args.seeds:
        for name in args.variants or list(VARIANTS):
            size, kind, opts = VARIANTS[name]
            tr = load(f"train-{size}.pt")
            emoji = [i for i, x in enumerate(tr["ids"]) if "demo_data" in x]
            val_emoji = torch.tensor(emoji[-VAL_EMOJI:])
            held = set(val_emoji.tolist())
            train_idx = torch.tensor([i for i in range(len(tr["ids"])) if i not in held])
            x_all = torch.cat([tr["multi"], tr["image"]], 1) if kind == "multistage" else tr["image"]
            if "grid" in opts:
                x_all = torch.cat([x_all, grid_features(image_net, load(f"train-{size}-maps.pt")["maps"], opts["grid"])], 1)
            x_aug = None
            if opts.get("augmented"):
                aug = load("train-224-aug.pt")
                assert aug["ids"] == tr["ids"], "the augmented view lists other samples: rerun features"
                x_aug = torch.cat([aug["multi"], aug["image"]], 1)
            maps = None
            if "last_stage_lr" in opts:
                cached = load(f"train-{size}-maps.pt")
                assert cached["ids"] == tr["ids"], "the stage maps list other samples: rerun features --stage-maps"
                maps = cached["maps"]
                with torch.no_grad():  # the copied stage reproduces the cached features (fp16 maps: small error)
                    gap = (LastStage(image_net)(maps[:64]) - x_all[:64, fixed_width:]).abs().max()
                assert gap < 0.05 * x_all[:64, fixed_width:].abs().max(), f"last stage off by {gap}"
            torch.manual_seed(seed)
            last = copy.deepcopy(bert.encoder.layer[-1]).requires_grad_(True) if "text_lr" in opts else None
            head = Head(kind, x_all.shape[1], opts, last, x_all[train_idx], tr["text"][train_idx])
            head.last_stage = LastStage(image_net) if maps is not None else None

            def image_input(index, x=x_all, stage_maps=maps):
                """Head input for these rows; with a trained last stage, its part is recomputed from the maps."""
                if head.last_stage is None:
                    return x[index]
                return torch.cat([x[index, :fixed_width], head.last_stage(stage_maps[index])], 1)

            def embed_text(hidden, mask, pooled=None):
                if head.last_layer is not None or pooled is None:
                    with torch.set_grad_enabled(head.last_layer is not None and torch.is_grad_enabled()):
                        pooled = _pool_last_layer(head.last_layer or bert.encoder.layer[-1], hidden, mask)
                return F.normalize(head.text(pooled) if head.text is not None else pooled, dim=-1)

            steps = opts.get("steps", 300)
            main = [p for n, p in head.named_parameters() if not n.startswith(("last_layer.", "last_stage."))]
            groups = [{"params": main, "lr": 1e-3}]
            if last is not None:
                groups.append({"params": list(last.parameters()), "lr": opts["text_lr"]})
            if head.last_stage is not None:
                groups.append({"params": list(head.last_stage.parameters()), "lr": opts["last_stage_lr"]})
            variant_rows = None
            if "caption_variants" in opts:  # MiniLM's pooled features of each sample's other captions
                metas, tokenize = _shard_json(tr["ids"]), towers.tokenizer()
                owners, texts = [], []
                for i in train_idx.tolist():
                    for caption in caption_variants(metas[tr["ids"][i]]) if tr["ids"][i] in metas else []:
                        owners.append(i)
                        texts.append(caption)
                with torch.no_grad():
                    extra = torch.cat([towers.model.text(torch.stack([tokenize(t) for t in texts[j:j + 256]]))
                                       for j in range(0, len(texts), 256)])
                variant_rows = {}
                for row, owner in enumerate(owners):
                    variant_rows.setdefault(owner, []).append(row)
                print(f"{len(texts)} other captions for {len(variant_rows)} training pairs, e.g. {texts[:3]}",
                      flush=True)
            # Emoji pairs drawn emoji_weight times as often as the others (data.shard_weights in the recipe).
            weight = torch.tensor([opts.get("emoji_weight", 1.0) if "demo_data" in tr["ids"][i] else 1.0
                                   for i in train_idx.tolist()])
            opt = torch.optim.AdamW(groups, weight_decay=opts.get("wd", 0.0), betas=(0.9, 0.98), eps=1e-6)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10 if s < 10 else
                                                      0.5 * (1 + math.cos(math.pi * (s - 10) / (steps - 10))))
            t0 = time.time()
            head.image.train()  # dropout (only the image head has any)
            if head.last_stage is not None:
                head.last_stage.train()  # batch statistics in its norms, as the engine trains unlocked groups
            for _ in range(steps):
                size_b = opts.get("batch", 256)
                draw = (torch.multinomial(weight, size_b, replacement=True) if "emoji_weight" in opts
                        else torch.randint(len(train_idx), (size_b,)))
                b = torch.unique(train_idx[draw])  # no sample twice in a batch
                mask = tr["mask"][b]
                used = int(mask.any(0).nonzero().max()) + 1
                pooled = None if last is not None else tr["text"][b]
                if variant_rows is not None:  # some captions swapped for one of the sample's others
                    pooled = pooled.clone()
                    for j, i in enumerate(b.tolist()):
                        if i in variant_rows and torch.rand(()) < opts["caption_variants"]:
                            rows_i = variant_rows[i]
                            pooled[j] = extra[rows_i[int(torch.randint(len(rows_i), ()))]]
                t = embed_text(tr["hidden"][b][:, :used], mask[:, :used], pooled)
                x = image_input(b)
                if x_aug is not None:  # each image: its plain or its augmented view, even odds
                    x = torch.where(torch.rand(len(b), 1) < 0.5, x_aug[b], x)
                i = F.normalize(head.image(x), dim=-1)
                logits = head.log_scale.clamp(max=math.log(100)).exp() * i @ t.T
                logits = logits if logits.dim() == 3 else logits[None]  # [members, B, B]
                if head.bias is not None:  # SigLIP: each pair a binary decision, summed over a row, mean over rows
                    sign = 2 * torch.eye(len(b)) - 1
                    loss = -F.logsigmoid(sign * (logits + head.bias)).sum(-1).mean()
                else:
                    y = torch.arange(len(b)).repeat(len(logits))
                    loss = (F.cross_entropy(logits.flatten(0, 1), y)
                            + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), y)) / 2
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            seconds = time.time() - t0
            head.eval()  # as head.image.eval() and head.last_stage.eval()
            with torch.no_grad():
                mask = tr["mask"][val_emoji]
                used = int(mask.any(0).nonzero().max()) + 1
                t = embed_text(tr["hidden"][val_emoji][:, :used], mask[:, :used],
                               None if last is not None else tr["text"][val_emoji])
                sim = F.normalize(head.image(image_input(val_emoji)), dim=-1) @ t.T
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
                    if "grid" in opts:
                        x = torch.cat([x, grid_features(image_net, load(f"{val}-val-{size}-maps.pt")["maps"],
                                                        opts["grid"])], 1)
                    val_maps = load(f"{val}-val-{size}-maps.pt")["maps"] if maps is not None else None
                    x = torch.cat([image_input(torch.arange(i, min(i + 500, len(x))), x, val_maps)
                                   for i in range(0, len(x), 500)])
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
    f.add_argument("--sizes", type=int, nargs="+", default=[128, 224], choices=[128, 224])
    f.add_argument("--stage-maps", action="store_true",
                   help="also keep the input to the image tower's last stage (for the last-stage variants)")
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
