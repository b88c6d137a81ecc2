"""AdamW with decoupled weight decay on matrices only, a warmup + cosine schedule, and a non-finite guard."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from polymodal.pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases, norm weights, scalars and other 1-D parameters get no weight decay (as in CLIP and ViT)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update, on every rank at once, when any gradient it sees is non-finite.

    Why here: DeepSpeed only checks for overflow with fp16 loss scaling (or bf16 when asked), and under ZeRO each
    rank steps its own partition, so one rank's NaN must stop all of them: the flag is all-reduced. A skipped
    step changes neither weights nor optimizer state; the learning-rate schedule still moves on.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.skipped_last = False
        self.last_norm = None  # norm of the gradients this rank saw (the global norm when not partitioned)

    @torch.no_grad()
    def _grads_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            # One fused pass: the norm is non-finite iff some element is.
            self.last_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            bad = (~torch.isfinite(self.last_norm)).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and bad.device.type != "cuda":
                bad = bad.cuda()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def step(self, closure=None):
        self.skipped_last = not self._grads_finite()
        if self.skipped_last:
            return None
        return super().step(closure)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    optimizer = GuardedAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    return optimizer, scheduler
