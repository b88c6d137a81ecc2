"""Cross-modal prediction with a trained MultiMAE on held-out images (the MultiMAE issue's Fashion-MNIST test), each
figure beside a baseline that needs no learning:

1. image -> segmentation: the model is given every token of the image and nothing else, predicts the class-painted
   segmentation, and the sample's class is the majority class of its predicted foreground pixels (the summed
   probabilities of classes 1..K when it predicts no foreground). Accuracy against chance (1 / classes).
2. edges -> image: the model is given every edge token and predicts the image; MSE and PSNR against the true image,
   beside the class-agnostic mean image of the training set.
3. masked-patch loss of each modality under training-style masks (drawn from --seed), beside predicting the
   training set's mean map (class frequencies per pixel for class maps) on the same masked patches.

    python benchmarks/multimae_crossmodal.py runs/multimae-fmnist --test out/fmnist/test --train out/fmnist/train \
        --image grey --edges edges --segmentation semseg --out multimae_crossmodal.json

Reads the run's model.safetensors; means come from the first --mean-images training images. CPU or --device cuda.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polymodal.data.config import DataConfig  # noqa: E402
from polymodal.data.pipeline import ShardLoader  # noqa: E402
from polymodal.distributed import Placement  # noqa: E402
from polymodal.pretrain.export import exported_metadata, load_exported  # noqa: E402
from polymodal.models.multimae import patchify  # noqa: E402
from polymodal.pretrain.objectives.multimae import token_losses  # noqa: E402


def batches(shards: str, size: int, batch_size: int, limit: int | None):
    cfg = DataConfig(shards=shards, modalities=["rgb", "label"], batch_size=batch_size, num_workers=1,
                     shuffle_buffer=0, shuffle_shards=False, image_size=size, augment=False)
    seen = 0
    for batch in ShardLoader(cfg, where=Placement(0, 1)):
        if limit is not None and seen >= limit:
            return
        yield batch
        seen += len(batch["__key__"])


@torch.no_grad()
def mean_maps(objective, shards: str, size: int, limit: int, device) -> dict[str, torch.Tensor]:
    """Per-pixel means over training images of each target as the model sees it: values, or class frequencies
    [classes, H, W] for class maps."""
    sums, count = {}, 0
    for batch in batches(shards, size, 256, limit):
        maps, _ = objective.prepare({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        for name, x in maps.items():
            spec = objective.specs[name]
            x = torch.nn.functional.one_hot(x, spec.classes).permute(0, 3, 1, 2).float() if spec.classes else x
            sums[name] = sums.get(name, 0) + x.sum(0)
        count += len(batch["__key__"])
    return {name: total / count for name, total in sums.items()}


def baseline_patches(objective, name: str, mean: torch.Tensor, batch: int) -> torch.Tensor:
    """The mean map as decoder output [B, N, values per patch] (log-frequencies as logits for class maps)."""
    spec = objective.specs[name]
    p = spec.patch_size
    if spec.classes:
        logits = patchify(mean.clamp_min(1e-6).log()[None], p)  # [1, N, classes * p * p], class-major
        logits = logits.unflatten(-1, (spec.classes, p * p)).transpose(-1, -2).flatten(-2)
        return logits.expand(batch, -1, -1)
    return patchify(mean[None], p).expand(batch, -1, -1)


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a MultiMAE run folder (model.safetensors)")
    parser.add_argument("--test", required=True, help="held-out shards (rgb + cls)")
    parser.add_argument("--train", required=True, help="training shards, for the mean maps")
    parser.add_argument("--image", default="grey", help="the image modality (unit values in [0, 1], mse loss)")
    parser.add_argument("--edges", default="edges")
    parser.add_argument("--segmentation", default="semseg")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--mean-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="multimae_crossmodal.json")
    args = parser.parse_args()
    t0 = time.time()
    weights = Path(args.run) / "model.safetensors" if Path(args.run).is_dir() else Path(args.run)
    objective = load_exported(weights).to(args.device)
    size = int(exported_metadata(weights)["polymodal.image_size"])
    means = mean_maps(objective, args.train, size, args.mean_images, args.device)
    seg_spec = objective.specs[args.segmentation]
    correct = total = 0
    image_se = mean_se = pixels = 0.0
    masked = {name: [0.0, 0.0, 0.0] for name in objective.model.targets}  # model loss sum, baseline sum, tokens
    torch.manual_seed(args.seed)
    for batch in batches(args.test, size, 256, args.limit):
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        maps, present = objective.prepare(batch)
        b = len(batch["__key__"])
        # 1. image -> segmentation
        seg = objective.predict({args.image: batch["rgb"] if args.image == "rgb" else
                                 (maps[args.image] * 255).round().to(torch.uint8)}, [args.segmentation])
        ids = seg[args.segmentation].flatten(1)
        votes = torch.nn.functional.one_hot(ids, seg_spec.classes)[..., 1:].sum(1)  # [B, classes - 1]
        predicted = votes.argmax(1)
        labels = batch["label"].to(predicted.device)
        correct += int((predicted == labels).sum())
        total += b
        # 2. edges -> image
        filled = objective.predict({args.edges: (maps[args.edges] * 255).round().to(torch.uint8)}, [args.image])
        truth = maps[args.image].float()
        image_se += float((filled[args.image].float() - truth).square().sum())
        mean_se += float((means[args.image][None] - truth).square().sum())
        pixels += truth.numel()
        # 3. masked-patch losses under training-style masks
        visible = objective.draw_visible(present, objective._tokens_each(maps))
        out = objective.model(objective.model_inputs(maps), visible, tuple(objective.model.targets),
                              objective.config.packed)
        for name in objective.model.targets:
            spec, loss = objective.specs[name], objective.modality_configs[name].loss
            hidden = (~objective.visible_of(visible, name)).float()
            ours = token_losses(out["predictions"][name].float(), maps[name], spec, loss)
            base = token_losses(baseline_patches(objective, name, means[name], b), maps[name], spec, loss)
            masked[name][0] += float((ours * hidden).sum())
            masked[name][1] += float((base * hidden).sum())
            masked[name][2] += float(hidden.sum())
    image_mse, mean_mse = image_se / pixels, mean_se / pixels
    report = {
        "run": str(args.run), "test_images": total, "seconds": round(time.time() - t0, 1),
        "segmentation_from_image": {"accuracy": correct / total, "chance": 1 / (seg_spec.classes - 1)},
        "image_from_edges": {"mse": image_mse, "psnr_db": psnr(image_mse), "mean_image_mse": mean_mse,
                             "mean_image_psnr_db": psnr(mean_mse)},
        "masked_patch_loss": {name: {"loss": s / max(c, 1), "predict_the_mean": bs / max(c, 1),
                                     "loss_kind": objective.modality_configs[name].loss}
                              for name, (s, bs, c) in masked.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
