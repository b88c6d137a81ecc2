"""SparK pretraining speed: our sparse encoder against the original SparK's dense-convolution-plus-mask encoder.

One process, one objective (polymodal's SparK: same timm backbone, same SparKDecoder, same norm-pix loss on masked
patches), two ways of running the encoder sparsely; everything else is shared code:

  ours  polymodal.models.sparse_conv.SparseEncoder: the mask is passed with the call, and hooks attached for that
        call zero the input of every convolution / windowed pooling at masked positions and let BatchNorm (and
        GroupNorm) use visible positions only; LayerNorm is left dense (its statistics are per position)
  peer  the approach of SparK's own code, github.com/keyu-tian/SparK, pretrain/encoder.py (and spark.py's forward).
        SparK is not pip-installable, so the peer is a re-implementation of that file's mechanism, kept inside
        this script: the backbone's nn.Conv2d / MaxPool2d / AvgPool2d / BatchNorm2d / LayerNorm modules are
        swapped for subclasses (SparseConv2d, SparseMaxPooling, SparseAvgPooling, SparseBatchNorm2d,
        SparseConvNeXtLayerNorm) whose forward reads the mask from a module-global `_cur_active`, upsampled to the
        layer's resolution with repeat_interleave at every call. Convolution and pooling run densely and then
        multiply their output by it in place; SparseBatchNorm2d (a BatchNorm1d) gathers the visible positions of
        the channels-last tensor with `mask.nonzero(as_tuple=True)` indexing, normalises them and scatters them
        into zeros; SparseConvNeXtLayerNorm does the same with LayerNorm, channels-last or (timm's LayerNorm2d)
        channels-first. ConvNeXt blocks also mask their output, as SparseConvNeXtBlock masks its branch before
        the residual add (the same values: the shortcut is already zero there). spark.py's forward sets the
        global, multiplies the image by the mask and runs the encoder. The original builds new modules and copies
        the weights; here the instances' classes are swapped in place, which computes the same. Backbones with
        layers the original has no sparse version of (GroupNorm, timm's BatchNormAct2d, Conv2dSame, ...) are
        refused.

Both sides start from the same weights (the peer loads our state dict: the swapped modules keep timm's names),
are trained with the same optimizer (torch.optim.AdamW, lr 1e-3, betas 0.9/0.95, weight decay 0.04 on matrices
only, as configs/spark-*-cifar.yaml; no clipping, no schedule), in fp32, with the same torch threads, on the same
batches of real data with the same masks per step (drawn once from --seed with our random_visible and handed to
both). Data: CIFAR-10 training images read through our pipeline (polymodal.data.pipeline.ShardLoader,
RandomResizedCrop scale 0.67-1 to --image-size, flip), from shards written once into --shards-dir with `python -m
polymodal data shards ../shared/data/cifar10/train.tar.gz DIR --split train --limit 2048`; --warmup + --steps
batches are read into memory beforehand, so data loading is not timed.

Timed per step: zero_grad, the objective's forward (normalisation, encoder, decoder, loss), backward, the
optimizer step and reading the loss (.item(); on a GPU, a device synchronize). The first --warmup steps of each
run are left out. Rounds interleave the sides (ours, peer, then peer, ours, ...); each side keeps training its own
model from round to round. Before each run the script waits (up to --max-wait s) for other processes to use at
most --max-other-load of the CPUs and then measures the share they took during the run. samples/s per run =
batch x timed steps / their summed time; figures are medians over runs, the ratio is ours/peer (> 1: ours faster).

Check: both sides compute the same function up to BatchNorm/LayerNorm implementation details, so the first step's
loss (same weights, batch and mask) must agree within --loss-tolerance (relative); the first round's whole loss
curves are compared too. A difference is reported, not fatal.

    python benchmarks/spark_step.py                                  # resnet18, 64 px, batch 32, 20 steps, 2 rounds
    python benchmarks/spark_step.py --model convnext_atto --image-size 96
    python benchmarks/spark_step.py --steps 2 --rounds 1 --batch-size 4 --max-wait 0   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

from bench_common import (add_quiet_options, add_step_benchmark_options, cifar_train_shards, machine_info,
                          preload_batches, timed_training_steps, write_report)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.layers import LayerNorm as TimmLayerNorm  # noqa: E402
from timm.layers import LayerNorm2d  # noqa: E402
from timm.models.convnext import ConvNeXtBlock  # noqa: E402
from torch import nn  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The peer: SparK's pretrain/encoder.py mechanism (github.com/keyu-tian/SparK), re-implemented for timm backbones

_cur_active: torch.Tensor | None = None  # bool [B, 1, f, f]; set before each encoder forward, as in SparK


def _get_active_ex_or_ii(H: int, returning_active_ex: bool = True):
    downsample_ratio = H // _cur_active.shape[-1]
    active_ex = _cur_active.repeat_interleave(downsample_ratio, 2).repeat_interleave(downsample_ratio, 3)
    return active_ex if returning_active_ex else active_ex.squeeze(1).nonzero(as_tuple=True)  # ii: bi, hi, wi


def sp_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    x = super(type(self), self).forward(x)
    x *= _get_active_ex_or_ii(H=x.shape[2], returning_active_ex=True)  # (BCHW) *= (B1HW): mask the output
    return x


def sp_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
    ii = _get_active_ex_or_ii(H=x.shape[2], returning_active_ex=False)
    bhwc = x.permute(0, 2, 3, 1)
    nc = super(type(self), self).forward(bhwc[ii])  # BatchNorm1d over the visible positions [N, C]
    bchw = torch.zeros_like(bhwc)
    bchw[ii] = nc
    return bchw.permute(0, 3, 1, 2)


class SparseConv2d(nn.Conv2d):
    forward = sp_conv_forward


class SparseMaxPooling(nn.MaxPool2d):
    forward = sp_conv_forward


class SparseAvgPooling(nn.AvgPool2d):
    forward = sp_conv_forward


class SparseBatchNorm2d(nn.BatchNorm1d):
    forward = sp_bn_forward


class SparseConvNeXtLayerNorm(nn.LayerNorm):
    """SparK's LayerNorm: visible positions only, zeros elsewhere; channels_last (BHWC) or channels_first (BCHW)."""

    data_format = "channels_last"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise NotImplementedError("SparK's sparse LayerNorm takes 4-D feature maps only")
        if self.data_format == "channels_last":
            ii = _get_active_ex_or_ii(H=x.shape[1], returning_active_ex=False)
            nc = super().forward(x[ii])
            x = torch.zeros_like(x)
            x[ii] = nc
            return x
        ii = _get_active_ex_or_ii(H=x.shape[2], returning_active_ex=False)
        bhwc = x.permute(0, 2, 3, 1)
        nc = super().forward(bhwc[ii])
        x = torch.zeros_like(bhwc)
        x[ii] = nc
        return x.permute(0, 3, 1, 2)


class SparseConvNeXtBlock(ConvNeXtBlock):
    """timm's block with SparK's final `x *= active` (SparK masks the branch before adding the shortcut, which is
    zero at masked positions already: the same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        x *= _get_active_ex_or_ii(H=x.shape[2], returning_active_ex=True)
        return x


# Exact types only: a subclass (timm's Conv2dSame, BatchNormAct2d ...) would lose its own forward.
_SWAPS = {nn.Conv2d: SparseConv2d, nn.MaxPool2d: SparseMaxPooling, nn.AvgPool2d: SparseAvgPooling,
          nn.BatchNorm2d: SparseBatchNorm2d, nn.LayerNorm: SparseConvNeXtLayerNorm,
          TimmLayerNorm: SparseConvNeXtLayerNorm, LayerNorm2d: SparseConvNeXtLayerNorm,
          ConvNeXtBlock: SparseConvNeXtBlock}
_NEEDS_SWAP = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm)


def dense_model_to_sparse(model: nn.Module) -> nn.Module:
    """SparK's SparseEncoder.dense_model_to_sparse, by swapping each module's class in place."""
    unsupported = set()
    for module in model.modules():
        sparse = _SWAPS.get(type(module))
        if sparse is not None:
            if sparse is SparseConvNeXtLayerNorm:
                module.data_format = "channels_first" if type(module) is LayerNorm2d else "channels_last"
            module.__class__ = sparse
        elif isinstance(module, _NEEDS_SWAP):
            unsupported.add(type(module).__name__)
    if unsupported:
        raise SystemExit(f"the peer (SparK's encoder.py) has no sparse version of {', '.join(sorted(unsupported))}: "
                         "pick a backbone built from plain Conv2d / pooling / BatchNorm2d / LayerNorm layers")
    return model


class OriginalSparseEncoder(nn.Module):
    """The same timm feature extractor as our SparseEncoder (same state dict keys), made sparse SparK's way."""

    def __init__(self, name: str):
        super().__init__()
        self.backbone = dense_model_to_sparse(
            timm.create_model(name, pretrained=False, features_only=True, feature_cls="getter"))
        self.reductions = list(self.backbone.feature_info.reduction())
        self.channels = list(self.backbone.feature_info.channels())
        self.stride = max(self.reductions)

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        # SparK's spark.py: set the global, mask the input, run the sparse encoder (every map is zero where masked).
        global _cur_active
        _cur_active = visible
        active_b1hw = visible.repeat_interleave(self.stride, 2).repeat_interleave(self.stride, 3)
        return self.backbone(images * active_b1hw)


# ---------------------------------------------------------------------------------------------------------------
# Setup: shards, batches, models


class PresetMask:
    """Stands in for SparK.random_visible: hands out the mask of the current step (the same on both sides)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def __call__(self, batch_size, height, width, device, generator=None) -> torch.Tensor:
        return self.mask


def build(args, device: torch.device):
    from polymodal.pretrain.objectives.spark import SparK

    torch.manual_seed(args.seed)
    config = SparK.Config(model=args.model, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width)
    ours = SparK(config)
    ours.check_image_size(args.image_size)  # whole patches at the backbone's stride, at least 2 visible
    peer = copy.deepcopy(ours)
    peer.encoder = OriginalSparseEncoder(args.model)
    peer.load_state_dict(ours.state_dict())  # strict: every weight and buffer of ours, under the same name
    return ours.to(device).train(), peer.to(device).train()


def draw_masks(objective, args, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return [objective.random_visible(args.batch_size, args.image_size, args.image_size, device="cpu",
                                     generator=generator).to(device) for _ in range(count)]


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    from polymodal.pretrain.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.04, 1e-3), lr=1e-3, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------------------------
# Timing


def run_side(args, model, optimizer, feed: PresetMask, batches, masks, device) -> dict:
    def step(i, batch):
        feed.mask = masks[i]
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        return loss

    return timed_training_steps(args, step, batches, device)


def loss_check(ours: dict, peer: dict, tolerance: float) -> dict:
    """First step: same weights, batch and mask on both sides. Then the first round's whole curves."""
    a, b = ours["losses"][0], peer["losses"][0]
    diff = abs(a - b)
    curve = [abs(x - y) for x, y in zip(ours["losses"], peer["losses"])]
    return {"first_loss": {"ours": a, "peer": b}, "abs_diff": diff, "rel_diff": diff / max(abs(a), 1e-12),
            "tolerance": tolerance, "match": diff <= tolerance * max(abs(a), 1e-12),
            "first_round_max_abs_diff": max(curve), "first_round_losses": {"ours": ours["losses"],
                                                                             "peer": peer["losses"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm convnet (default: %(default)s; also convnext_atto)")
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of the stride, >= 2x it (default 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--decoder-width", type=int, default=256, help="as configs/spark-*-cifar.yaml")
    add_step_benchmark_options(parser, REPO, "bench-out/spark_step.json")
    add_quiet_options(parser)
    args = parser.parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        sys.exit("--steps and --rounds must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shard_dir = cifar_train_shards(args, REPO)
    count = args.warmup + args.steps
    batches = preload_batches(args, shard_dir, count, device, (0.67, 1.0))
    ours, peer = build(args, device)
    masks = draw_masks(ours, args, count, device)
    feeds = {"ours": PresetMask(), "peer": PresetMask()}
    ours.random_visible, peer.random_visible = feeds["ours"], feeds["peer"]
    models = {"ours": ours, "peer": peer}
    optimizers = {side: optimizer_for(m) for side, m in models.items()}
    params = sum(p.numel() for p in ours.parameters())
    grid = args.image_size // ours.encoder.stride
    print(f"[setup] SparK {args.model} + decoder width {args.decoder_width} ({params / 1e6:.1f} M parameters), "
          f"{args.image_size} px ({grid}x{grid} patches, mask ratio {args.mask_ratio}), batch {args.batch_size}, "
          f"{args.device}, {args.threads} threads; {args.rounds} round(s) of {args.warmup} + {args.steps} steps; "
          f"{count} CIFAR-10 train batches from {shard_dir}", flush=True)

    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for rnd in range(args.rounds):
        for side in (("ours", "peer") if rnd % 2 == 0 else ("peer", "ours")):
            rec = run_side(args, models[side], optimizers[side], feeds[side], batches, masks, device)
            runs[side].append(rec)
            load = f", other processes {100 * rec['other_load']:.0f}% of the CPUs" \
                if rec["other_load"] is not None else ""
            print(f"[round {rnd + 1}] {side:4s} {rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.0f} ms "
                  f"per step (median of {args.steps}), first loss {rec['losses'][0]:.6f}{load}", flush=True)

    check = loss_check(runs["ours"][0], runs["peer"][0], args.loss_tolerance)
    med = {s: statistics.median(r["samples_per_s"] for r in runs[s]) for s in runs}
    ms = {s: statistics.median(r["ms_per_step"] for r in runs[s]) for s in runs}
    ratio = med["ours"] / med["peer"]
    per_round = [o["samples_per_s"] / p["samples_per_s"] for o, p in zip(runs["ours"], runs["peer"])]

    names = {"ours": "ours (SparseEncoder, per-call hooks)", "peer": "SparK encoder.py (dense op x mask)"}
    print(f"\n{'encoder':40s} {'samples/s':>10s} {'ms/step':>9s}  runs (samples/s)")
    for side in ("ours", "peer"):
        each = ", ".join(f"{r['samples_per_s']:.1f}" for r in runs[side])
        print(f"{names[side]:40s} {med[side]:10.1f} {ms[side]:9.0f}  {each}")
    print(f"ratio ours/peer (median of {args.rounds}): {ratio:.2f}x (per round "
          f"{', '.join(f'{r:.2f}' for r in per_round)})")
    verdict = "match" if check["match"] else "DIFFER"
    print(f"first-step loss: ours {check['first_loss']['ours']:.6f}, peer {check['first_loss']['peer']:.6f}, "
          f"|diff| {check['abs_diff']:.2e} (relative {check['rel_diff']:.2e}, tolerance {args.loss_tolerance}: "
          f"{verdict}); largest |diff| over round 1's {count} steps {check['first_round_max_abs_diff']:.2e}")

    report = {"benchmark": "benchmarks/spark_step.py",
              "what": "SparK pretraining step (fwd+bwd+AdamW), our SparseEncoder vs a re-implementation of "
                      "keyu-tian/SparK pretrain/encoder.py (dense op x module-global mask), same backbone, "
                      "decoder, loss, weights, batches and masks",
              "settings": {k: getattr(args, k) for k in ("model", "image_size", "batch_size", "steps", "warmup",
                                                         "rounds", "threads", "mask_ratio", "decoder_width",
                                                         "seed", "device", "limit")},
              "shards": str(shard_dir), "parameters": params,
              "machine": machine_info("torch", "timm", device=device),
              "runs": runs, "samples_per_s": med, "ms_per_step": ms, "ratio": ratio, "ratio_per_round": per_round,
              "loss_check": check}
    path = write_report(args.out, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
