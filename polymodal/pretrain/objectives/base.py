"""The base class of training objectives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from polymodal.data.errors import ConfigError


class Objective(nn.Module):
    """A module that owns its model(s) and turns a batch into `{"loss": scalar tensor, **metrics}`.

    Metrics are floats or 0-dim tensors; the engine averages them over ranks for the log. The batch arrives on
    the device with images still uint8, so normalisation runs there. `samples_in(batch)` and `tokens_in(batch)`
    let the engine report throughput.
    """

    name: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_engine(self, zero_stage: int) -> None:
        """Refuse engine settings this objective cannot train with (a ConfigError naming the key)."""

    def tokenizer(self):
        """A callable the data pipeline applies to captions in its workers (text objectives), or None."""
        return None

    def samples_in(self, batch: dict[str, Any]) -> int:
        return len(batch["__key__"])

    def tokens_in(self, batch: dict[str, Any]) -> int | None:
        """Tokens processed for this batch (text tokens, visible patches...), or None when it has no meaning."""
        return None

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
