"""Contrastive image-text objectives: `clip` (InfoNCE) and `siglip` (sigmoid loss) on open_clip towers.

The model is an open_clip CLIP, so its state dict is an open_clip checkpoint (see export_open_clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from polymodal.models import open_clip_towers
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.objectives.contrastive_loss import clip_loss, siglip_loss


@dataclass
class ContrastiveConfig:
    # An open_clip model config name (open_clip.list_models()) or one of ours (polymodal-tiny-vit).
    model: str = "polymodal-tiny-vit"
    # A local open_clip checkpoint file to start from (never downloaded).
    pretrained: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Loss: each rank scores its rows against all gathered columns; chunk_size rows at a time (None: all).
    local_loss: bool = True
    gather_with_grad: bool = True
    chunk_size: Optional[int] = None
    # The learned temperature: logit_scale = exp(t), clamped to at most max_logit_scale.
    max_logit_scale: float = 100.0
    # FLIP: drop this fraction of image patches in training (ViT towers).
    patch_dropout: float = 0.0
    # LiT-style locking: freeze a tower except its last unlocked groups/layers.
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0


class Contrastive(Objective):
    Config = ContrastiveConfig
    siglip = False

    def __init__(self, config: ContrastiveConfig):
        super().__init__(config)
        kwargs = dict(config.model_kwargs)
        if self.siglip:
            kwargs.setdefault("init_logit_scale", math.log(10))
            kwargs.setdefault("init_logit_bias", -10.0)
        self.model = open_clip_towers.create(config.model, config.pretrained, config.patch_dropout, **kwargs)
        if config.lock_image:
            self.model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
        if config.lock_text:
            self.model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers)
        pre = self.model.visual.preprocess_cfg
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, -1, 1, 1) * 255, persistent=False)
        self._tokenizer = open_clip_towers.tokenizer(config.model)

    def tokenizer(self):
        return self._tokenizer

    def tokens_in(self, batch: dict[str, Any]) -> int | None:
        """Text tokens (open_clip pads with id 0)."""
        return int((batch["caption"] != 0).sum())

    def normalize_images(self, rgb: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return ((rgb.to(self.mean.dtype) - self.mean) / self.std).to(dtype)

    def encode_image(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.normalize_images(rgb), normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = self.encode_image(batch["rgb"]).float()
        text = self.encode_text(batch["caption"]).float()
        scale = self.model.logit_scale.float().clamp(max=math.log(self.config.max_logit_scale)).exp()
        if self.siglip:
            loss = siglip_loss(image, text, scale, self.model.logit_bias.float(), chunk_size=self.config.chunk_size)
        else:
            loss = clip_loss(image, text, scale, local_loss=self.config.local_loss,
                             gather_with_grad=self.config.gather_with_grad, chunk_size=self.config.chunk_size)
        with torch.no_grad():
            hits = (image @ text.T).argmax(dim=1) == torch.arange(len(image), device=image.device)
        return {"loss": loss, "logit_scale": scale.detach(), "batch_i2t_acc": hits.float().mean()}


@register("clip")
class Clip(Contrastive):
    pass


@register("siglip")
class SigLip(Contrastive):
    siglip = True
