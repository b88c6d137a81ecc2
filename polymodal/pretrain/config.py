"""The experiment config of `polymodal pretrain`: typed sections read from YAML plus `key=value` overrides.

The `objective:` section is checked against the schema of the objective it names, so `objective.lr_typo=1`
is an error naming `objective.lr_typo`, like any other key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polymodal.config import load_config
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    # AdamW weight decay; never applied to biases, norm weights or scalars (parameters with fewer than 2 dims).
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    # 'cosine' decays from lr to lr * min_lr_ratio after warmup; 'constant' stays at lr.
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    # Learning-rate multipliers by parameter-name prefix (the longest matching prefix wins), e.g. a slower rate
    # for a pretrained tower's unlocked layers: {model.text.net.encoder.layer.5: 0.1}.
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps (0: only at the end and on SIGTERM), and keep the last K complete ones.
    every: int = 1000
    keep: int = 3
    # Write consolidated weights to RUN_DIR/model.safetensors when training ends.
    export: bool = True


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True
    # Every N steps (0: never), objectives that can draw their work (spark: input, masked input, reconstruction)
    # write RUN_DIR/images/STEP.png from the run's first batch, so progress on the same images is visible.
    images_every: int = 0


@dataclass
class FaultConfig:
    # A non-finite loss or gradient skips the step; this many in a row abort the run.
    max_nonfinite_in_row: int = 5
    # Fault injection for tests and drills: make the loss NaN at these steps, or SIGKILL this process
    # in the middle of writing the checkpoint of this step (after the weights, before it is marked complete).
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    inject_kill_in_checkpoint: Optional[int] = None


@dataclass
class EvaluateConfig:
    # Held-out image-caption shards: text<->image retrieval of the exported model when training ends.
    retrieval_shards: Optional[str] = None
    # Labelled shard folders in CLIP_benchmark's layout (classnames.txt beside them): zero-shot accuracy.
    zeroshot: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    # Optimizer steps to train. Each takes grad_accum micro-batches of data.batch_size on every rank.
    steps: int = 100
    grad_accum: int = 1
    # Clip the global gradient norm to this (0 turns clipping off).
    grad_clip: float = 1.0
    # fp32, bf16 or fp16; unset: the launcher's choice (accelerate's mixed_precision) or fp32.
    precision: Optional[str] = None
    # DeepSpeed ZeRO stage 0-3; unset: the launcher's choice (accelerate's zero_stage) or 0.
    zero_stage: Optional[int] = None
    activation_checkpointing: bool = False
    compile: bool = False
    # 'latest' (the last complete checkpoint in run_dir, or a fresh start if there is none), a tag such as
    # step_00000100, or unset for a fresh run (refused when run_dir already holds checkpoints).
    resume: Optional[str] = None
    # Peak FLOP/s of one device for MFU; unset: looked up for known GPUs, unknown on CPU.
    peak_flops: Optional[float] = None
    # A polymodal export (model.safetensors) whose tensors start this run where names and shapes match, e.g. the
    # projections a linear-map run learned (configs/lit-linear.yaml); the rest keeps its own initialisation.
    init_from: Optional[str] = None
    # Extra DeepSpeed config entries merged over the generated ones (expert use).
    deepspeed: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # The objective's own section; 'name' picks the objective, the other keys follow its schema.
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "classify"})


def load_section(schema: type, values: dict, prefix: str) -> Any:
    """Check a free-form section against `schema`; errors name the full key (`objective.width`)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"config key {prefix + '.' + key if key else prefix!r}: {message}") from None


def check(cfg: PretrainConfig) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {message}")

    need(cfg.steps > 0, "steps", f"must be positive, got {cfg.steps}")
    need(cfg.grad_accum > 0, "grad_accum", f"must be positive, got {cfg.grad_accum}")
    need(cfg.grad_clip >= 0, "grad_clip", f"must be >= 0, got {cfg.grad_clip}")
    need(cfg.precision is None or cfg.precision in PRECISIONS, "precision",
         f"must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    need(cfg.zero_stage is None or cfg.zero_stage in (0, 1, 2, 3), "zero_stage",
         f"must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    need(cfg.optim.schedule in ("cosine", "constant"), "optim.schedule",
         f"must be cosine or constant, got {cfg.optim.schedule!r}")
    need(cfg.optim.lr > 0, "optim.lr", f"must be positive, got {cfg.optim.lr}")
    need(0 <= cfg.optim.warmup_steps, "optim.warmup_steps", "must be >= 0")
    need(len(cfg.optim.betas) == 2, "optim.betas", f"needs two values, got {cfg.optim.betas}")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be at least 1, got {cfg.checkpoint.keep}")
    need(cfg.log.every >= 1, "log.every", "must be at least 1")
    need(cfg.faults.max_nonfinite_in_row >= 1, "faults.max_nonfinite_in_row", "must be at least 1")
    need(cfg.data.shards not in ([], "", None), "data.shards", "missing: give the training shards")
    objective_config(cfg.objective)


def check_paths(cfg: PretrainConfig) -> None:
    """Every local training shard must exist, checked before training starts (the pipeline itself skips and counts
    a missing shard, which in a training run would quietly drop part of the data), and so must `init_from`."""
    from polymodal.data.shardlist import expand_shards, missing_local

    where = f" (relative paths are read from the current folder, {Path.cwd()})"
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"config key 'init_from': no file {cfg.init_from}{where}")
    try:
        urls = expand_shards(cfg.data.shards, allow_pipe=cfg.data.allow_pipe)
    except ConfigError as exc:
        raise ConfigError(f"config key 'data.shards': {exc}{where}") from None
    missing = missing_local(urls)
    if missing:
        raise ConfigError(f"config key 'data.shards': {len(missing)} of {len(urls)} shards do not exist (first: "
                          f"{missing[0]}){where}")


def objective_config(section: dict[str, Any]) -> Any:
    """The objective's typed config, checked against the schema of the objective `section['name']` names."""
    from polymodal.pretrain.objectives import objective_class

    cls = objective_class(section.get("name", ""))
    return load_section(cls.Config, {k: v for k, v in section.items() if k != "name"}, "objective")


def load_pretrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    cfg = load_config(PretrainConfig, path, overrides)
    check(cfg)
    return cfg
