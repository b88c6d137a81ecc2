"""AdamW with decoupled weight decay on matrices only, a warmup + cosine schedule, and a non-finite guard."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from polymodal.data.errors import ConfigError
from polymodal.pretrain.config import OptimConfig


def param_group_names(model: nn.Module, lr_scale: dict[str, float] | None = None
                      ) -> list[tuple[list[str], bool, float]]:
    """The optimizer's groups as (trainable parameter names, weight-decayed?, learning-rate multiplier), in the
    optimizer's order: matrices get weight decay; biases, norm weights, scalars and other 1-D parameters do not
    (as in CLIP and ViT). `lr_scale` maps parameter-name prefixes to multipliers (the longest matching prefix
    wins); the default rate's groups come first. Empty groups are left out. Export reads DeepSpeed's ZeRO-0 fp32
    master copies back to names in this order (the checkpoint records it)."""
    lr_scale = lr_scale or {}
    unused = [prefix for prefix in lr_scale if not any(name.startswith(prefix) and p.requires_grad
                                                       for name, p in model.named_parameters())]
    if unused:
        raise ConfigError(f"config key 'optim.lr_scale': {unused[0]!r} is the prefix of no trainable parameter")
    groups: dict[tuple[float, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefixes = [p for p in lr_scale if name.startswith(p)]
            scale = lr_scale[max(prefixes, key=len)] if prefixes else 1.0
            groups.setdefault((scale, param.ndim >= 2), []).append(name)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    return [(groups[key], key[1], key[0]) for key in order]


def param_groups(model: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float] | None = None
                 ) -> list[dict]:
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in names], "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale}
            for names, decayed, scale in param_group_names(model, lr_scale)]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update, on every rank at once, when any gradient it sees is non-finite.

    Why here: DeepSpeed only checks for overflow with fp16 loss scaling (or bf16 when asked), and under ZeRO each
    rank steps its own partition, so one rank's NaN must stop all of them: the flag is all-reduced. A skipped
    step changes neither weights nor optimizer state; the learning-rate schedule still moves on.

    The decision stays on the device: torch's fused AdamW kernel takes a `found_inf` tensor (GradScaler's hook)
    and skips the update, step count included, where it is 1, so the host never waits for the device here. Where
    the fused kernel is unavailable (a device without one), the flag is read on the host.
    """

    def __init__(self, params, **kwargs):
        params = list(params)
        try:
            super().__init__(params, fused=True, **kwargs)
        except RuntimeError:
            super().__init__(params, **kwargs)
        self.skipped: torch.Tensor | None = None  # 1.0 when the last step was skipped (on the device)
        self.last_norm = None  # norm of the gradients this rank saw (the global norm when not partitioned)

    @torch.no_grad()
    def _nonfinite(self) -> torch.Tensor:
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
        return bad

    def step(self, closure=None):
        self.skipped = self._nonfinite()
        if self.defaults.get("fused"):
            self.found_inf = self.skipped
            return super().step(closure)
        if self.skipped.item():
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
    optimizer = GuardedAdamW(param_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scale), lr=cfg.lr,
                             betas=tuple(cfg.betas),
                             eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    return optimizer, scheduler
