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
    """What one optimizer step did on this rank. The tensors stay on the device (nothing here waits for it) until
    `Engine.reduce` averages a run of steps over ranks in one all-reduce."""
    metrics: dict[str, Any] = field(default_factory=dict)  # 0-dim tensors summed over micro-batches
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    nonfinite: Any = 0.0  # count of non-finite micro-batch losses (a tensor)
    skipped: Any = 0.0  # 1.0 when the optimizer skipped the update (a tensor, the same on every rank)
    data_wait: float = 0.0


@dataclass
class ReducedStep:
    """One step's figures over all ranks: metrics averaged over ranks and micro-batches, counts summed."""
    metrics: dict[str, float]
    samples: int
    tokens: int
    bad: bool  # the loss or a gradient was not finite: the step changed nothing
    data_wait: float  # seconds, mean over ranks


class BufferSnapshot:
    """A device-side copy of the buffers a forward pass changes (BatchNorm's running statistics), put back where a
    device-side flag says the step was skipped: a skipped step leaves them unchanged without the host waiting for
    the device. One flat copy per dtype keeps it to a few kernel launches whatever the number of layers."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in buffers:
            self.groups.setdefault(buffer.dtype, []).append(buffer)
        self.saved: dict[torch.dtype, torch.Tensor] = {}

    def take(self) -> None:
        self.saved = {dtype: torch.cat([b.detach().reshape(-1) for b in group]) for dtype, group in self.groups.items()}

    @torch.no_grad()
    def restore_where(self, skipped: torch.Tensor) -> None:
        for dtype, group in self.groups.items():
            now = torch.cat([b.reshape(-1) for b in group])
            kept = torch.where(skipped.to(now.device) > 0, self.saved[dtype], now)
            # A private but long-standing multi-tensor copy (torch >= 2.1): one launch for all the buffers.
            torch._foreach_copy_(group, [part.view_as(b) for part, b in zip(kept.split([b.numel() for b in group]),
                                                                              group)])


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


def undo_initialisation_step(wrapper, optimizer: torch.optim.Optimizer) -> None:
    """Take back the optimizer step DeepSpeed's ZeRO-0 half-precision wrapper (FP16_UnfusedOptimizer, used for
    bf16 and fp16 at ZeRO 0 with a torch optimizer) runs with zero gradients when it is built, to create the
    optimizer state. For AdamW that step counts (so the first real update used bias corrections for step 2: 0.74x
    the learning rate at betas 0.9/0.98, measured) and applies one weight decay. Clearing the state lets AdamW
    start it afresh at the first real step, and the fp32 masters are set back to the weights they were copied
    from. ZeRO 1-3 take no such step."""
    fp32_groups, half_groups = getattr(wrapper, "fp32_groups", None), getattr(wrapper, "fp16_groups", None)
    if fp32_groups is None or half_groups is None:  # another wrapper (a future DeepSpeed): nothing to undo
        return
    optimizer.state.clear()
    with torch.no_grad():
        for masters, halves in zip(fp32_groups, half_groups):
            for master, half in zip(masters, halves):
                master.copy_(half.float())


def model_construction(cfg: PretrainConfig, world: World, objective_cls: type[Objective]):
    """The context the objective is built in: `deepspeed.zero.Init` at ZeRO-3 for objectives whose models allow it
    (each parameter is partitioned as soon as its layer is built, so no rank ever holds the whole model), else
    nothing. Returns (context, partitioned)."""
    import contextlib

    precision, stage = resolve_precision_and_stage(cfg, world)
    if stage != 3 or not objective_cls.partitioned_init(cfg.objective):
        return contextlib.nullcontext(), False
    if cfg.init_from:
        raise ConfigError("config key 'init_from': it copies whole tensors into the model before training, which a "
                          "model built partitioned under ZeRO-3 does not hold; use zero_stage 0-2 for init_from")
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, precision, stage),
                               remote_device=None, enabled=True), True


class Engine:
    """Owns the DeepSpeed engine built around an objective; `step()` runs one optimizer step."""

    def __init__(self, cfg: PretrainConfig, objective: Objective, world: World, load_universal: bool = False):
        import deepspeed

        self.cfg, self.world = cfg, world
        self.precision, self.stage = resolve_precision_and_stage(cfg, world)
        if cfg.activation_checkpointing:
            objective.set_grad_checkpointing(True)
        self.optimizer, scheduler = build_optimizer(objective, cfg.optim, cfg.steps)
        self.ds_config = deepspeed_config(cfg, self.precision, self.stage, load_universal)
        if self.precision != "fp32":
            match_norm_statistics(objective, torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=objective, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        if self.stage == 0 and self.precision != "fp32":
            undo_initialisation_step(self.ds.optimizer, self.optimizer)
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
        self.buffers = BufferSnapshot(objective.mutable_buffers())

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
        every rank; `poison` does the same on purpose (fault injection). Nothing here waits for the device: the
        skip decision, the restore of batch-norm statistics and the metrics all stay on it until `reduce`.
        """
        result = StepResult()
        skipped_before = self.ds.skipped_steps  # counts fp16 loss-scale overflows
        self.optimizer.skipped = None
        self.buffers.take()  # forward changes batch-norm statistics; a skipped step must not keep NaNs there
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
        overflowed = self.ds.skipped_steps != skipped_before
        if overflowed or self.optimizer.skipped is None:
            # An fp16 loss-scale overflow: DeepSpeed skipped the step before our optimizer ran. Routine while the
            # scale settles, so not a fault (unless the loss itself was not finite), but the buffers go back too.
            self.buffers.restore_where(torch.ones((), device=self.world.device))
            result.skipped = torch.zeros((), device=self.world.device)
        else:
            result.skipped = self.optimizer.skipped
            self.buffers.restore_where(result.skipped)
        return result

    def reduce(self, results: list[StepResult], stop_requested: bool) -> tuple[list[ReducedStep], bool]:
        """The steps since the last call over all ranks, in one all-reduce and one wait for the device: per step,
        metrics averaged over ranks and micro-batches, sample counts summed, flags OR-ed; and whether any rank
        was asked to stop."""
        keys = sorted(results[0].metrics)
        device = self.world.device
        rows = []
        for r in results:
            if sorted(r.metrics) != keys:
                raise RuntimeError(f"objective metrics changed between steps: {keys} then {sorted(r.metrics)}")
            counters = torch.tensor([r.micro_batches, r.samples, r.tokens, r.data_wait], dtype=torch.float64,
                                    device=device)
            flags = torch.stack([torch.as_tensor(r.nonfinite, device=device).double().reshape(()),
                                 torch.as_tensor(r.skipped, device=device).double().reshape(())])
            rows.append(torch.cat([torch.stack([r.metrics[k].double() for k in keys]).to(device), flags, counters]))
        tensor = torch.cat([torch.stack(rows).flatten(), torch.tensor([float(stop_requested)], dtype=torch.float64,
                                                                       device=device)])
        if self.world.world_size > 1:
            dist.all_reduce(tensor)
        values = tensor.tolist()
        stop = values.pop() > 0
        width = len(keys) + 6
        out = []
        for i in range(len(results)):
            *metric_sums, nonfinite, skipped, micro, samples, tokens, data_wait = values[i * width:(i + 1) * width]
            out.append(ReducedStep(metrics={k: v / micro for k, v in zip(keys, metric_sums)}, samples=int(samples),
                                   tokens=int(tokens), bad=nonfinite > 0 or skipped > 0,
                                   data_wait=data_wait / self.world.world_size))
        return out, stop
