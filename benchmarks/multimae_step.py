"""MultiMAE pretraining speed: our objective against the mechanism of the original MultiMAE code.

One process, one model (the same weights, the same math, the same losses), two ways of running a training step:

  ours  the `multimae` objective (polymodal.pretrain.objectives.multimae) as the engine runs it: edges and grey
        derived from rgb on the device, the visible tokens drawn by polymodal.pretrain.objectives.masking (one
        vectorised Dirichlet + argsort pass over the batch, on the device), the visible tokens selected with a
        boolean mask and packed (cumulative lengths), every attention through our attention function
        (polymodal.models.attention: on CPU torch SDPA per sequence with a key-padding mask, on CUDA in bf16 the
        varlen kernels), the output adapters' queries put together with our Visible.scatter / select.
  peer  the approach of MultiMAE's own code, github.com/EPFL-VILAB/MultiMAE (multimae/multimae.py,
        multimae/output_adapters.py, multimae/multimae_utils.py). It is not pip-installable, so the peer is a
        re-implementation of its mechanism kept in this script, run on our objective's parameters (a copy of our
        model whose forward is written out): patch embedding with the same convolutions plus fixed sin-cos
        positions (a table built once, as the original's pos_emb) and the modality embeddings; masking as
        MultiMAE.generate_random_masks (a Dirichlet draw for the batch with torch.distributions.Dirichlet on the
        CPU, then per modality a noise argsort, a concatenation, an argsort giving ids_keep / ids_restore), or
        with --peer-masking per-sample a Python loop over the samples (a Dirichlet draw, rounding fixed to the
        exact count, and a torch.randperm per modality for each sample, on the CPU, as a loader would); the
        visible tokens gathered with torch.gather to the fixed count (`--num-visible`, no padding needed, no
        packing), the global tokens concatenated last; every block written out as multimae_utils.Block does
        (LayerNorm, qkv Linear, softmax(q k^T * scale) v by hand, proj, residual, LayerNorm, MLP); each output
        adapter as SpatialOutputAdapter.get_queries_and_context (mask tokens concatenated after the projected
        visible tokens, un-shuffled with ids_restore, position and modality embeddings added, the queries sliced
        out, the context gathered back with ids_keep, the global tokens appended), then the cross-attention
        (multimae_utils.CrossAttention by hand), the MLP and the decoder blocks.
        Where our model's math differs from the original's (our cross-attention block keeps a residual, our
        encoder and decoder stacks end with a LayerNorm, our encoder adds a learned modality embedding), the peer
        computes ours: only the mechanism differs.

Both sides derive edges and grey with the same functions inside the timed step, compute the same losses (the
objective's `losses`: normalised-pixel MSE for rgb, L1 on standardised maps for the others, masked tokens only),
start from the same weights (the peer loads our state dict), and are trained with the same optimizer
(torch.optim.AdamW, lr 1.5e-3, betas 0.9/0.95, weight decay 0.05 on matrices only, as configs/multimae-cifar.yaml;
no clipping, no schedule), at the same --precision (fp32; bf16: autocast, on CUDA or on a CPU with bf16
instructions; --peer-precision gives the peer another one, e.g. fp32, all the original has on a CPU: its training
loop autocasts with torch.cuda.amp), with the same torch threads, on
the same batches of real data. Both draw a fixed count of visible tokens per sample (--num-visible), so both do
the same work. Data: CIFAR-10 training images read through our pipeline (polymodal.data.pipeline.ShardLoader,
RandomResizedCrop scale 0.6-1 to --image-size, flip), from shards written once into --shards-dir with `python -m
polymodal data shards ../shared/data/cifar10/train.tar.gz DIR --split train --limit 2048`; --warmup + --steps
batches are read into memory beforehand, so data loading is not timed.

Timed per step: zero_grad, the forward (deriving the modalities, normalisation, masking, encoder, decoders, loss),
backward, the optimizer step and reading the loss (.item(); on a GPU, a device synchronize). The first --warmup
steps of each run are left out. Each run starts from torch.manual_seed(--seed), so its masks are reproducible (each
side draws its own masks its own way). Rounds interleave the sides (ours, peer, then peer, ours, ...); each side
keeps training its own model from round to round. Before each run the script waits (up to --max-wait s) for other
processes to use at most --max-other-load of the CPUs and then measures the share they took during the run.
samples/s per run = batch x timed steps / their summed time; figures are medians over runs, the ratio is
ours/peer (> 1: ours faster).

Also: peak memory of one more training step per side after the rounds, above what was in use before it (weights,
optimizer state, batch): on CUDA torch's peak allocation, on CPU glibc's heap bytes in use sampled by a thread
(benchmarks/attention.py's HeapPeak); training FLOPs per sample (3x the forward, counted by torch on the peer's
written-out forward, whose every matrix product is visible to the counter; the same work on both sides) and, on a
GPU torch knows the datasheet peak of, MFU.

Check: before any training, both models (same weights) take the same batch with the SAME visible tokens (drawn
once with our masking, handed to both), forward and backward in fp32 (whatever --precision): the losses must agree
within --loss-tolerance (relative); the largest gradient difference is reported too. A difference is reported, not
fatal.

    python benchmarks/multimae_step.py                                 # 32 px, patch 4, dim 192 x 6, batch 64
    python benchmarks/multimae_step.py --peer-masking per-sample       # the peer masks sample by sample
    python benchmarks/multimae_step.py --steps 2 --rounds 1 --batch-size 4 --max-wait 0   # smoke run
    python benchmarks/multimae_step.py --device cuda --precision bf16 --image-size 224 --patch-size 16 --dim 768 \\
        --depth 12 --heads 12 --decoder-dim 256 --decoder-depth 2 --decoder-heads 8 --num-visible 98
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

from bench_common import (add_quiet_options, add_step_benchmark_options, cifar_train_shards, finish, machine_info,
                          preload_batches, timed_training_steps)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributions.dirichlet import Dirichlet  # noqa: E402

from polymodal.models.transformer import grid_positions, sincos_2d  # noqa: E402
from polymodal.pretrain.objectives.masking import draw_visible  # noqa: E402
from polymodal.pretrain.objectives.multimae import MultiMAEObjective  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The peer: MultiMAE's mechanism (github.com/EPFL-VILAB/MultiMAE), written out on our model's parameters


def reference_random_masks(batch: int, segments: list[int], num_encoded: int, alphas: list[float],
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MultiMAE.generate_random_masks (sample_tasks_uniformly=False): (mask_all [B, N] 1 = masked, ids_keep [B, n],
    ids_restore [B, N])."""
    task_sampling_dist = Dirichlet(torch.Tensor(alphas)).sample((batch,)).to(device)
    samples_per_task = (task_sampling_dist * num_encoded).round().long()
    task_masks = []
    for i, num_tokens in enumerate(segments):
        noise = torch.rand(batch, num_tokens, device=device)
        ids_arange_shuffle = torch.argsort(noise, dim=1)
        mask = torch.arange(num_tokens, device=device).unsqueeze(0).expand(batch, -1)
        mask = torch.gather(mask, dim=1, index=ids_arange_shuffle)
        mask = torch.where(mask < samples_per_task[:, i].unsqueeze(1), 0, 1)
        task_masks.append(mask)
    mask_all = torch.cat(task_masks, dim=1)
    ids_shuffle = torch.argsort(mask_all, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_encoded]
    mask_all = torch.ones_like(mask_all)
    mask_all[:, :num_encoded] = 0
    mask_all = torch.gather(mask_all, dim=1, index=ids_restore)
    return mask_all, ids_keep, ids_restore


def per_sample_random_masks(batch: int, segments: list[int], num_encoded: int, alphas: list[float],
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same split drawn sample by sample in Python on the CPU (as a data loader would): per sample a Dirichlet
    draw, counts rounded and fixed to exactly `num_encoded`, a torch.randperm per modality; then MultiMAE's
    ids_keep / ids_restore from the binary mask."""
    dirichlet = Dirichlet(torch.tensor(alphas))
    starts = [sum(segments[:i]) for i in range(len(segments))]
    mask_all = torch.ones(batch, sum(segments), dtype=torch.long)
    for b in range(batch):
        counts = (dirichlet.sample() * num_encoded).round().long().clamp(max=torch.tensor(segments)).tolist()
        for i in torch.randperm(len(segments)).tolist():  # fix the rounding: exactly num_encoded tokens
            extra = num_encoded - sum(counts)
            counts[i] = min(max(counts[i] + extra, 0), segments[i])
        for i, (start, n) in enumerate(zip(starts, segments)):
            mask_all[b, start + torch.randperm(n)[:counts[i]]] = 0
    mask_all = mask_all.to(device)
    ids_shuffle = torch.argsort(mask_all, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return mask_all, ids_shuffle[:, :num_encoded], ids_restore


PEER_MASKING = {"reference": reference_random_masks, "per-sample": per_sample_random_masks}


def attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v


def self_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """multimae_utils.Attention.forward on our Attention's weights (qkv laid out as (3, heads, head_dim))."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = attention_by_hand(q, k, v, attn.head_dim ** -0.5).transpose(1, 2).reshape(B, N, C)
    return attn.proj(x)


def cross_attention(attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """multimae_utils.CrossAttention.forward on our Attention's weights (q, kv)."""
    B, N, C = x.shape
    _, M, _ = context.shape
    q = attn.q(x).reshape(B, N, attn.heads, C // attn.heads).permute(0, 2, 1, 3)
    kv = attn.kv(context).reshape(B, M, 2, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    x = attention_by_hand(q, k, v, attn.head_dim ** -0.5).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(x)


def mlp(m, x: torch.Tensor) -> torch.Tensor:
    return m.fc2(F.gelu(m.fc1(x)))


def block(b, x: torch.Tensor) -> torch.Tensor:
    """multimae_utils.Block.forward (no drop-path, no layer scale: refused in setup)."""
    x = x + self_attention(b.attn, b.norm1(x))
    return x + mlp(b.mlp, b.norm2(x))


class ReferenceMultiMAE(MultiMAEObjective):
    """Our objective's parameters, run MultiMAE's way (the module docstring). Made from a copy of ours by swapping
    its class in place, so every parameter keeps its name and our state dict loads strictly."""

    def setup_peer(self, image_size: int, masking: str) -> None:
        model = self.model
        if set(model.inputs) != set(model.targets) or any(s.classes for s in model.specs):
            raise SystemExit("the peer takes image-like modalities that are both inputs and targets")
        if len({s.patch_size for s in model.specs}) != 1:
            raise SystemExit("the peer takes one patch size for every modality")
        for blk in [*model.encoder.blocks, *(b for d in model.decoders.values() for b in d.blocks.blocks)]:
            if not all(isinstance(getattr(blk, n), torch.nn.Identity) for n in ("ls1", "ls2", "drop_path1",
                                                                              "drop_path2")):
                raise SystemExit("the peer has no layer scale or drop-path")
            if not isinstance(blk.attn.q_norm, torch.nn.Identity):
                raise SystemExit("the peer has no QK-norm")
        if not isinstance(self.budget, int):
            raise SystemExit("the peer draws a fixed count of visible tokens: --num-visible is one number")
        self.masking = PEER_MASKING[masking]
        self.preset_visible: torch.Tensor | None = None  # for the loss check only
        # Fixed sin-cos tables, built once (the original's pos_emb, a parameter without gradient).
        patch = model.specs[0].patch_size
        rows, cols = grid_positions(image_size // patch, image_size // patch)
        self.register_buffer("pos_enc", sincos_2d(rows, cols, model.dim), persistent=False)
        dec_dim = next(iter(model.decoders.values())).mask_token.shape[0]
        self.register_buffer("pos_dec", sincos_2d(rows, cols, dec_dim), persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        maps, present = self.prepare(batch)  # the same derivation and normalisation as ours
        model = self.model
        dtype = next(model.parameters()).dtype
        tokens = []
        for i, name in enumerate(model.inputs):  # input adapters: patches + positions (+ our modality embedding)
            t = model.adapters[name].proj(maps[name].to(dtype)).flatten(2).transpose(1, 2)
            tokens.append(t + (self.pos_enc + model.modality_embed[i].float()).to(t.dtype))
        segments = [t.shape[1] for t in tokens]
        B = tokens[0].shape[0]
        if self.preset_visible is None:
            alphas = self.alpha if isinstance(self.alpha, list) else [float(self.alpha)] * len(segments)
            mask_all, ids_keep, ids_restore = self.masking(B, segments, self.budget, alphas, tokens[0].device)
        else:  # MultiMAE.forward with task_masks given
            mask_all = (~self.preset_visible).long()
            ids_shuffle = torch.argsort(mask_all, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            ids_keep = ids_shuffle[:, :self.budget]
        x = torch.cat(tokens, dim=1)
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x, model.global_tokens.to(x.dtype).unsqueeze(0).expand(B, -1, -1)], dim=1)
        for blk in model.encoder.blocks:
            x = block(blk, x)
        x = model.encoder.norm(x)
        predictions = {name: self.decode(name, x, segments, ids_keep, ids_restore) for name in model.targets}
        return self.losses(maps, present, mask_all == 0, {"predictions": predictions})

    def decode(self, name: str, encoder_tokens: torch.Tensor, segments: list[int], ids_keep: torch.Tensor,
               ids_restore: torch.Tensor) -> torch.Tensor:
        """SpatialOutputAdapter.forward on our OutputAdapter's weights."""
        dec, g = self.model.decoders[name], self.model.global_count
        context_tokens = dec.proj_context(encoder_tokens)
        B, _, d = context_tokens.shape
        N = sum(segments)
        # get_queries_and_context
        without_global = context_tokens[:, :-g]
        mask_tokens = dec.mask_token.to(context_tokens.dtype).reshape(1, 1, d).repeat(B, N - without_global.shape[1],
                                                                                        1)
        context_with_mask = torch.cat([without_global, mask_tokens], dim=1)
        context_with_mask = torch.gather(context_with_mask, dim=1,
                                         index=ids_restore.unsqueeze(-1).repeat(1, 1, context_with_mask.shape[2]))
        context_emb = torch.cat([(self.pos_dec + dec.modality_embed[i].float()).unsqueeze(0).expand(B, -1, -1)
                                 for i in range(len(segments))], dim=1)
        context_with_mask = context_with_mask + context_emb.to(context_with_mask.dtype)
        i = self.model.inputs.index(name)
        start = sum(segments[:i])
        queries = context_with_mask[:, start:start + segments[i]]
        visible_context = torch.gather(context_with_mask, dim=1,
                                       index=ids_keep.unsqueeze(-1).repeat(1, 1, context_with_mask.shape[2]))
        context = torch.cat([visible_context, context_tokens[:, -g:]], dim=1)
        # cross-attention (our block keeps the residual) and MLP, then the decoder blocks and the head
        cross = dec.cross
        x = queries + cross_attention(cross.cross_attn, cross.norm_cross(queries), cross.norm_context(context))
        x = x + mlp(cross.mlp, cross.norm2(x))
        for blk in dec.blocks.blocks:
            x = block(blk, x)
        return dec.head(dec.blocks.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# Setup: shards, batches, models


def objective_section(args) -> dict:
    modalities = {"rgb": {"channels": 3}, "edges": {"derive": "edges", "channels": 1},
                  "grey": {"derive": "grey", "channels": 1}}
    return {"name": "multimae", "patch_size": args.patch_size, "dim": args.dim, "depth": args.depth,
            "heads": args.heads, "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth,
            "decoder_heads": args.decoder_heads, "num_visible": args.num_visible, "alpha": args.alpha,
            "modalities": {name: modalities[name] for name in args.modalities}}


def build(args, device: torch.device):
    from polymodal.pretrain.objectives import build_objective

    torch.manual_seed(args.seed)
    ours = build_objective(objective_section(args))
    tokens = len(args.modalities) * (args.image_size // args.patch_size) ** 2
    if args.image_size % args.patch_size or not 0 < args.num_visible < tokens:
        sys.exit(f"--image-size must be a multiple of --patch-size and --num-visible below the {tokens} tokens")
    peer = copy.deepcopy(ours)
    peer.__class__ = ReferenceMultiMAE
    peer.setup_peer(args.image_size, args.peer_masking)
    peer.load_state_dict(ours.state_dict())  # strict: every weight and buffer of ours, under the same name
    return ours.to(device).train(), peer.to(device).train()


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    from polymodal.pretrain.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.05, 1.5e-3), lr=1.5e-3, betas=(0.9, 0.95))


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# The check, timing, memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_check(args, ours, peer, batch, device, tolerance: float) -> dict:
    """Same weights, batch and visible tokens (drawn once with our masking): forward and backward on both, in
    fp32."""
    m, n = len(ours.model.inputs), (args.image_size // args.patch_size) ** 2
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        visible = draw_visible(torch.ones(args.batch_size, m, dtype=torch.bool, device=device), [n] * m,
                               torch.full((args.batch_size,), args.num_visible, device=device), args.alpha)
    ours.draw_visible = lambda present, tokens_each: visible
    peer.preset_visible = visible
    losses = {}
    try:
        for side, model in (("ours", ours), ("peer", peer)):
            model.zero_grad(set_to_none=True)
            loss = model(batch)["loss"]  # fp32 whatever --precision: a check of the math, not of bf16 kernels
            loss.backward()
            losses[side] = loss.item()
    finally:
        del ours.draw_visible
        peer.preset_visible = None
    peer_grads = dict(peer.named_parameters())
    grad_diff, grad_scale = 0.0, 0.0
    for name, p in ours.named_parameters():
        q = peer_grads[name]
        if p.grad is None or q.grad is None:
            continue
        grad_diff = max(grad_diff, (p.grad.float() - q.grad.float()).abs().max().item())
        grad_scale = max(grad_scale, p.grad.float().abs().max().item())
    ours.zero_grad(set_to_none=True)
    peer.zero_grad(set_to_none=True)
    a, b = losses["ours"], losses["peer"]
    diff = abs(a - b)
    return {"first_loss": {"ours": a, "peer": b}, "abs_diff": diff, "rel_diff": diff / max(abs(a), 1e-12),
            "tolerance": tolerance, "match": diff <= tolerance * max(abs(a), 1e-12),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
            "grad_rel_diff": grad_diff / max(grad_scale, 1e-12)}


def run_side(args, model, optimizer, batches, device, precision: str) -> dict:
    torch.manual_seed(args.seed)  # each run's masks are reproducible; each side draws them its own way

    def step(_, batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        return loss

    return timed_training_steps(args, step, batches, device)


def memory_step(args, model, optimizer, batch, device, precision: str) -> dict:
    """One more training step: peak bytes above those in use before it (weights, optimizer state, batch)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        loss.item()

    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": (peak - base) / 2 ** 20, "peak_total_mb": peak / 2 ** 20,
                "how": "torch.cuda.max_memory_allocated above memory_allocated before the step"}
    try:
        from attention import HeapPeak

        with HeapPeak() as heap:
            step()
    except (OSError, AttributeError) as exc:  # no glibc mallinfo2 here
        return {"peak_mb": None, "how": f"not measured: {exc}"}
    return {"peak_mb": heap.bytes / 2 ** 20,
            "how": "glibc mallinfo2 heap bytes in use, sampled every 0.2 ms, above those in use before the step"}


def flops_per_sample(peer, batch, device) -> float | None:
    """3x the forward FLOPs per sample, counted on the peer (every product is a visible matmul / bmm)."""
    from polymodal.pretrain.flops import training_flops_per_sample

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return training_flops_per_sample(peer, batch, samples=2)
    except Exception as exc:  # noqa: BLE001 - optional figure
        print(f"[flops] not counted: {exc}", flush=True)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modalities", nargs="+", default=["rgb", "edges", "grey"],
                        choices=["rgb", "edges", "grey"], help="input and target modalities (default: all three)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--decoder-dim", type=int, default=128)
    parser.add_argument("--decoder-depth", type=int, default=1)
    parser.add_argument("--decoder-heads", type=int, default=4)
    parser.add_argument("--num-visible", type=int, default=48, help="visible tokens per sample, both sides")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    parser.add_argument("--peer-masking", choices=sorted(PEER_MASKING), default="reference",
                        help="reference: MultiMAE's generate_random_masks (batched); per-sample: a Python loop over "
                             "the samples on the CPU (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast around the forward (on CUDA; on a CPU with bf16 instructions too) "
                             "(default: %(default)s)")
    parser.add_argument("--peer-precision", choices=["fp32", "bf16"], default=None,
                        help="the peer's precision when it differs from ours (default: --precision); fp32 is all "
                             "the original has on a CPU (its autocast is torch.cuda.amp's)")
    add_step_benchmark_options(parser, REPO, "bench-out/multimae_step.json")
    add_quiet_options(parser)
    args = parser.parse_args(argv)
    args.peer_precision = args.peer_precision or args.precision
    precision = {"ours": args.precision, "peer": args.peer_precision}
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.modalities = list(dict.fromkeys(args.modalities))
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        sys.exit("--steps and --rounds must be >= 1, --warmup >= 0")

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shard_dir = cifar_train_shards(args, REPO)
    count = args.warmup + args.steps
    batches = preload_batches(args, shard_dir, count, device, (0.6, 1.0), keys=("rgb", "__key__"))
    ours, peer = build(args, device)
    models = {"ours": ours, "peer": peer}
    optimizers = {side: optimizer_for(m) for side, m in models.items()}
    params = sum(p.numel() for p in ours.parameters())
    grid = args.image_size // args.patch_size
    print(f"[setup] MultiMAE {'+'.join(args.modalities)}, dim {args.dim} x {args.depth} ({args.heads} heads), "
          f"decoders {args.decoder_dim} x {args.decoder_depth} ({args.decoder_heads} heads) "
          f"({params / 1e6:.1f} M parameters), {args.image_size} px ({grid}x{grid} patches per modality, "
          f"{args.num_visible} of {grid * grid * len(args.modalities)} visible), batch {args.batch_size}, "
          f"{args.device} {args.precision} (peer {args.peer_precision}), {args.threads} threads, peer masking "
          f"{args.peer_masking}; "
          f"{args.rounds} round(s) of {args.warmup} + {args.steps} steps; {count} CIFAR-10 train batches from "
          f"{shard_dir}", flush=True)

    check = loss_check(args, ours, peer, batches[0], device, args.loss_tolerance)
    verdict = "match" if check["match"] else "DIFFER"
    print(f"[check] same weights, batch and visible tokens: loss ours {check['first_loss']['ours']:.6f}, peer "
          f"{check['first_loss']['peer']:.6f}, |diff| {check['abs_diff']:.2e} (relative {check['rel_diff']:.2e}, "
          f"tolerance {args.loss_tolerance}: {verdict}); largest gradient difference {check['grad_max_abs_diff']:.2e} "
          f"({check['grad_rel_diff']:.2e} of the largest gradient)", flush=True)
    flops = flops_per_sample(peer, batches[0], device)

    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for rnd in range(args.rounds):
        for side in (("ours", "peer") if rnd % 2 == 0 else ("peer", "ours")):
            rec = run_side(args, models[side], optimizers[side], batches, device, precision[side])
            runs[side].append(rec)
            load = f", other processes {100 * rec['other_load']:.0f}% of the CPUs" \
                if rec["other_load"] is not None else ""
            print(f"[round {rnd + 1}] {side:4s} {rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.0f} ms "
                  f"per step (median of {args.steps}), first loss {rec['losses'][0]:.6f}{load}", flush=True)
    memory = {side: memory_step(args, models[side], optimizers[side], batches[0], device, precision[side])
              for side in models}

    med = {s: statistics.median(r["samples_per_s"] for r in runs[s]) for s in runs}
    ms = {s: statistics.median(r["ms_per_step"] for r in runs[s]) for s in runs}
    ratio = med["ours"] / med["peer"]
    per_round = [o["samples_per_s"] / p["samples_per_s"] for o, p in zip(runs["ours"], runs["peer"])]
    from polymodal.pretrain.flops import device_peak_flops

    peak_flops = device_peak_flops(device, args.precision)
    mfu = {s: flops * med[s] / peak_flops for s in med} if flops and peak_flops else None

    names = {"ours": "ours (device masking, packed, our attention)",
             "peer": f"MultiMAE's mechanism ({args.peer_masking} masking)"}
    print(f"\n{'side':46s} {'samples/s':>10s} {'ms/step':>9s} {'peak MB':>9s}  runs (samples/s)")
    for side in ("ours", "peer"):
        each = ", ".join(f"{r['samples_per_s']:.1f}" for r in runs[side])
        peak = memory[side]["peak_mb"]
        print(f"{names[side]:46s} {med[side]:10.1f} {ms[side]:9.0f} {'-' if peak is None else f'{peak:.0f}':>9s}  "
              f"{each}")
    print(f"ratio ours/peer (median of {args.rounds}): {ratio:.2f}x (per round "
          f"{', '.join(f'{r:.2f}' for r in per_round)})")
    if flops:
        print(f"training FLOPs per sample {flops / 1e9:.3f} G" + (
            f"; MFU ours {100 * mfu['ours']:.1f}%, peer {100 * mfu['peer']:.1f}% of {peak_flops / 1e12:.0f} TFLOP/s"
            if mfu else ""))
    print(f"check: loss ours {check['first_loss']['ours']:.6f}, peer {check['first_loss']['peer']:.6f} ({verdict})")

    report = {"benchmark": "benchmarks/multimae_step.py",
              "what": "MultiMAE pretraining step (derive edges/grey + masking + fwd + bwd + AdamW), our multimae "
                      "objective vs a re-implementation of EPFL-VILAB/MultiMAE's mechanism (batched or per-sample "
                      "masking, fixed-count gather, hand-written attention, ids_restore output adapters) on the "
                      "same weights, math, losses and batches",
              "settings": {k: getattr(args, k) for k in ("modalities", "image_size", "patch_size", "dim", "depth",
                                                         "heads", "decoder_dim", "decoder_depth", "decoder_heads",
                                                         "num_visible", "alpha", "peer_masking", "batch_size",
                                                         "steps", "warmup", "rounds", "threads", "precision",
                                                         "peer_precision", "seed", "device", "limit", "max_wait",
                                                         "max_other_load")},
              "shards": str(shard_dir), "parameters": params,
              "machine": machine_info("torch", "kornia", device=device),
              "runs": runs, "samples_per_s": med, "ms_per_step": ms, "ratio": ratio, "ratio_per_round": per_round,
              "peak_memory": memory, "flops_per_sample": flops, "peak_flops": peak_flops, "mfu": mfu,
              "loss_check": check}
    return finish(args.out, report, t_start)


if __name__ == "__main__":
    sys.exit(main())
