"""Supervised image classification with cross-entropy: the smallest real objective (images + labels).

It exercises the engine on real labelled shards (CIFAR-10, Fashion-MNIST) and gives supervised baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError
from polymodal.models.vit import VisionTransformer
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
OUR_VIT = "polymodal-vit"


@register("classify")
class Classify(Objective):
    @dataclass
    class Config:
        # Any timm model name (timm.list_models()), built without downloading weights, or "polymodal-vit": our
        # ViT on polymodal/models/transformer.py (model_kwargs: img_size, patch_size, embed_dim, depth, num_heads,
        # mlp, qk_norm, layer_scale, attention_backend...), built partitioned under ZeRO-3.
        model: str = "resnet18"
        num_classes: int = 10
        model_kwargs: dict[str, Any] = field(default_factory=dict)
        label_smoothing: float = 0.0
        mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
        std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __init__(self, config: Config):
        super().__init__(config)
        if config.model == OUR_VIT:
            try:
                self.model = VisionTransformer(num_classes=config.num_classes, **config.model_kwargs)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config key 'objective.model_kwargs': {exc}") from None
        elif config.model in timm.list_models():
            self.model = timm.create_model(config.model, pretrained=False, num_classes=config.num_classes,
                                           **config.model_kwargs)
        else:
            raise ConfigError(f"config key 'objective.model': {config.model!r} is neither a timm model name nor "
                              f"{OUR_VIT!r}")
        # Buffers, so they move with the module and stay out of the optimizer.
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1) * 255, persistent=False)

    @classmethod
    def partitioned_init(cls, section: dict[str, Any]) -> bool:
        return section.get("model") == OUR_VIT

    def eval_encoder(self, name: str):
        from polymodal.eval.encoders import image_features_encoder

        return image_features_encoder(name, self)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, of normalised images (for linear probe and kNN)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = (batch["rgb"].to(self.mean.dtype) - self.mean) / self.std
        logits = self.model(images.to(next(self.model.parameters()).dtype))
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc": accuracy.detach()}
