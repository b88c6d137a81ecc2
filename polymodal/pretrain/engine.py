"""The DeepSpeed side of training: its config, `initialize`, and one optimizer step over micro-batches.

DeepSpeed does the sharding (ZeRO 0-3), mixed precision, gradient accumulation and clipping; this file turns
our config into DeepSpeed's and keeps every rank in step when a loss or gradient is not finite.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from polymodal.data.errors import ConfigError
from polymodal.pretrain.config import PretrainConfig
from polymodal.pretrain.distributed import World
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.optim import build_optimizer

log = logging.getLogger("polymodal")


def launcher_choice(cfg_value, env_name: str, key: str, convert):
    """A setting the launcher may also give (accelerate's config file); both given and different is an error."""
    env_value = os.environ.get(env_name)
    from_env = convert(env_value) if env_value not in (None, "") else None
    if cfg_value is not None and from_env is not None and cfg_value != from_env:
        raise ConfigError(f"config key {key!r}: the config says {cfg_value!r} but the launcher ({env_name}) says "
                          f"{from_env!r}; drop one of them")
    return cfg_value if cfg_value is not None else from_env


def resolve_precision_and_stage(cfg: PretrainConfig, world: World) -> tuple[str, int]:
    # accelerate always exports ACCELERATE_MIXED_PRECISION, as 'no' when its config does not choose.
    accelerate_precision = {"no": None, "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}
    precision = launcher_choice(cfg.precision, "ACCELERATE_MIXED_PRECISION", "precision",
                                lambda v: accelerate_precision.get(v, v))
    stage = launcher_choice(cfg.zero_stage, "ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero_stage", int)
    precision = precision or "fp32"
    if precision == "fp16" and world.device.type == "cpu":
        raise ConfigError("config key 'precision': fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision, 0 if stage is None else stage


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: PretrainConfig, precision: str, stage: int, load_universal: bool = False) -> dict:
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        # Set explicitly: since DeepSpeed 0.19.3 it defaults to 1.0.
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our optimizer is torch's AdamW (no JIT-built op); DeepSpeed must be told that is fine under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return deep_merge(generated, cfg.deepspeed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@dataclass
class StepResult:
    """What one optimizer step did on this rank, before the values are averaged over ranks."""
    metrics: dict[str, Any] = field(default_factory=dict)  # 0-dim tensors summed over micro-batches
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    nonfinite: Any = 0.0  # count of non-finite micro-batch losses (a tensor)
    skipped: bool = False
    data_wait: float = 0.0


def match_norm_statistics(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast BatchNorm running statistics to the dtype DeepSpeed gives the weights under bf16/fp16.

    DeepSpeed casts parameters only and leaves buffers as they are (fp32), and `batch_norm` refuses half-precision
    weights with fp32 running statistics, so any BatchNorm model (ResNet, SparK's decoder) would fail at its first
    step. Other buffers (rotary frequencies, position ids) keep their dtype, as DeepSpeed intends."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buffer = getattr(norm, name)
                if buffer is not None and buffer.is_floating_point():
                    setattr(norm, name, buffer.to(dtype))


class Engine:
    """Owns the DeepSpeed engine built around an objective; `step()` runs one optimizer step."""

    def __init__(self, cfg: PretrainConfig, objective: Objective, world: World, load_universal: bool = False):
        import deepspeed

        self.cfg, self.world = cfg, world
        self.precision, self.stage = resolve_precision_and_stage(cfg, world)
        objective.check_engine(self.stage)
        if cfg.activation_checkpointing:
            objective.set_grad_checkpointing(True)
        self.optimizer, scheduler = build_optimizer(objective, cfg.optim, cfg.steps)
        self.ds_config = deepspeed_config(cfg, self.precision, self.stage, load_universal)
        if self.precision != "fp32":
            match_norm_statistics(objective, torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=objective, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        if world.world_size == 1 and self.stage == 0 and self.precision == "fp32":
            # Alone, DeepSpeed would still copy every gradient into a flat buffer and back to "all-reduce" it
            # (a fifth of a ResNet-18 step on CPU, measured by benchmarks/engine_overhead.py). ZeRO 1-3 and
            # the bf16 optimizer collect gradients in that path, so it stays on for them.
            self.ds.enable_backward_allreduce = False
        self._clipped_norm = None
        # DeepSpeed clips fp32 ZeRO-0 gradients itself but drops the norm; keep it for the log.
        self.ds.clip_fp32_gradients = self._clip_and_record
        if cfg.compile:
            self.ds.compile()
        self.objective = objective

    @property
    def module(self) -> Objective:
        return self.ds.module

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def _clip_and_record(self) -> None:
        # torch's fused clipping: at ZeRO 0 the gradients are already all-reduced, so this is the global norm;
        # DeepSpeed's own version also fails on 0-dim parameters (CLIP's logit_scale).
        params = [p for p in self.ds.module.parameters() if p.grad is not None]
        self._clipped_norm = torch.nn.utils.clip_grad_norm_(params, self.ds.gradient_clipping(), foreach=True)

    def grad_norm(self) -> float | None:
        """The global gradient norm before clipping, from whichever part computed it."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = self._clipped_norm if self._clipped_norm is not None else self.optimizer.last_norm
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def step(self, batches: Iterator[dict], poison: bool = False) -> StepResult:
        """Forward/backward over grad_accum micro-batches, then DeepSpeed's optimizer step (at the boundary).

        A non-finite loss is turned into NaN gradients (loss * NaN), so the guarded optimizer skips the step on
        every rank; `poison` does the same on purpose (fault injection). Nothing here waits for the device:
        metrics stay tensors until `average_over_ranks`.
        """
        result = StepResult()
        skipped_before = self.ds.skipped_steps  # counts fp16 loss-scale overflows
        # Batch-norm statistics change in forward; a skipped step must not keep NaNs there either.
        buffers = [b for b in self.ds.module.buffers() if b.is_floating_point()]
        saved = [b.clone() for b in buffers]
        nonfinite = torch.zeros((), device=self.world.device)
        for _ in range(self.cfg.grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            result.data_wait += time.perf_counter() - waited
            result.samples += self.objective.samples_in(batch)
            result.tokens += self.objective.tokens_in(batch) or 0
            out = self.ds(to_device(batch, self.world.device))
            loss = out["loss"]
            finite = torch.isfinite(loss.detach())
            nonfinite = nonfinite + (~finite).float()
            # A multiplier rather than where(finite, loss, nan): where's backward would give 0 * nan = nan.
            scale = torch.where(finite & (not poison), 1.0, float("nan"))
            loss = loss * scale
            self.ds.backward(loss)
            self.ds.step()
            result.micro_batches += 1
            for key, value in out.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                result.metrics[key] = result.metrics.get(key, 0.0) + value.to(nonfinite.device)
        result.nonfinite = nonfinite + float(poison)
        # fp16 loss-scale overflows (DeepSpeed skips those itself) are routine while the scale settles: they
        # restore the buffers too but do not count as faults unless the loss itself was not finite.
        result.skipped = self.optimizer.skipped_last
        if result.skipped or self.ds.skipped_steps != skipped_before:
            with torch.no_grad():
                for buffer, before in zip(buffers, saved):
                    buffer.copy_(before)
        return result

    def average_over_ranks(self, result: StepResult, stop_requested: bool) -> tuple[dict[str, float], dict]:
        """One all-reduce: metrics averaged over ranks and micro-batches, sample counts summed, flags OR-ed."""
        keys = sorted(result.metrics)
        device = self.world.device
        counters = torch.tensor([result.micro_batches, result.samples, result.tokens, float(result.skipped),
                                 float(stop_requested), result.data_wait], dtype=torch.float64, device=device)
        tensor = torch.cat([torch.stack([result.metrics[k].double() for k in keys]).to(device),
                            torch.as_tensor(result.nonfinite, dtype=torch.float64, device=device).view(1),
                            counters])
        if self.world.world_size > 1:
            dist.all_reduce(tensor)
        summed = tensor.tolist()
        nonfinite, micro, samples, tokens, skipped, stop, data_wait = summed[len(keys):]
        metrics = {k: v / micro for k, v in zip(keys, summed)}
        flags = {"samples": int(samples), "tokens": int(tokens), "nonfinite_loss": nonfinite > 0,
                 "skipped": skipped > 0, "stop": stop > 0, "data_wait": data_wait / self.world.world_size}
        return metrics, flags
