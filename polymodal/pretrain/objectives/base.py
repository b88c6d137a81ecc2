"""The base class of training objectives: the forward the engine calls, and the hooks the loop, the CLI and export
call (so none of them probes an objective with getattr or checks its name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from polymodal.data.errors import ConfigError

if TYPE_CHECKING:
    from polymodal.pretrain.config import PretrainConfig


class Objective(nn.Module):
    """A module that owns its model(s) and turns a batch into `{"loss": scalar tensor, **metrics}`.

    Metrics are floats or 0-dim tensors; the engine averages them over ranks for the log. The batch arrives on
    the device with images still uint8, so normalisation runs there. `samples_in(batch)` and `tokens_in(batch)`
    let the engine report throughput.

    Hooks, each with a default that does nothing:
    - `check_run(cfg, zero_stage)`: refuse settings this objective cannot train with, before anything starts;
    - `log_images(batch, path)`: draw the objective's work on a batch (objectives that set `draws_images`);
    - `eval_encoder(name)`: the model as `polymodal eval` and `embed` use it;
    - `evaluate(run_dir, weights, cfg)`: end-of-run evaluation on every rank, with the exported weights
      (objectives that set `evaluates`);
    - `export_formats`: the `checkpoint export --format` names it supports (registered in pretrain/export.py).
    """

    name: ClassVar[str] = ""
    draws_images: ClassVar[bool] = False
    evaluates: ClassVar[bool] = False  # reads the `evaluate:` section at the end of a run
    export_formats: ClassVar[tuple[str, ...]] = ("polymodal",)

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def partitioned_init(cls, section: dict[str, Any]) -> bool:
        """Whether the model this config section builds may be constructed under `deepspeed.zero.Init` at ZeRO-3
        (each parameter initialised in its own layer's constructor, then partitioned: the whole model never
        exists on one rank). Models that initialise weights after construction (timm's ViT) must say no."""
        return False

    def check_run(self, cfg: PretrainConfig, zero_stage: int) -> None:
        """Refuse run settings this objective cannot train with: a ConfigError naming the key. Subclasses that
        override it call this one too."""
        if cfg.log.images_every and not self.draws_images:
            raise ConfigError(f"config key 'log.images_every': objective {self.name!r} draws no images; set it to 0")
        if (cfg.evaluate.retrieval_shards or cfg.evaluate.zeroshot) and not self.evaluates:
            raise ConfigError(f"config key 'evaluate': objective {self.name!r} has no end-of-run evaluation of "
                              "retrieval or zero-shot; remove the section and run `polymodal eval` on the run")

    def tokenizer(self):
        """A callable the data pipeline applies to captions in its workers (text objectives), or None."""
        return None

    def samples_in(self, batch: dict[str, Any]) -> int:
        return len(batch["__key__"])

    def tokens_in(self, batch: dict[str, Any]) -> int | None:
        """Tokens processed for this batch (text tokens, visible patches...), or None when it has no meaning."""
        return None

    def mutable_buffers(self) -> list[torch.Tensor]:
        """The floating-point buffers a training forward changes, which a skipped step puts back: BatchNorm's
        running statistics. Objectives whose forward updates other buffers (EMA codebooks) add theirs."""
        return [buffer for norm in self.modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)
                for buffer in (norm.running_mean, norm.running_var)
                if buffer is not None and buffer.is_floating_point()]

    def log_images(self, batch: dict[str, Any], path: Path | None) -> Path | None:
        """Draw the objective's work on `batch` to the PNG `path`. Called on every rank when the weights are
        partitioned (ZeRO-3 gathers them collectively); `path` is None on all ranks but the one that writes."""
        return None

    def eval_encoder(self, name: str):
        """The trained model as `polymodal eval` and `embed` see it (a polymodal.eval.encoders.Encoder: image
        features, and text features for two-tower models), or None when it offers no features."""
        return None

    def evaluate(self, run_dir: Path, weights: Path, cfg: PretrainConfig) -> dict | None:
        """Evaluate the exported `weights` when training ends; called on every rank of the process group at once.
        Returns the metrics (the same on every rank), or None when the objective has nothing to evaluate."""
        return None

    def timm_export(self, image_size: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The image backbone as a timm state dict and its metadata (`timm.model`, optionally `timm.model_kwargs`
        as JSON), for objectives that list "timm" in `export_formats`; `image_size` is the training resolution."""
        raise ConfigError(f"--format timm: objective {self.name!r} has no timm backbone")

    def predict_files(self, given: dict[str, Path], targets: list[str], out: Path,
                      image_size: int | None) -> Path:
        """`polymodal predict`: fill `targets` from the modalities in the `given` image files; write a PNG."""
        raise ConfigError(f"objective {self.name!r} does not predict modalities from others")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward. Works for models that offer it (timm, open_clip)."""
        found = False
        for model in self.children():
            if hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(enable)
                found = True
        if not found:
            raise ConfigError(f"config key 'activation_checkpointing': objective {self.name!r} has no model "
                              "that supports it")
