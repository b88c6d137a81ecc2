"""SparK (Tian et al. 2023, "Designing BERT for Convolutional Networks"): masked image modelling for convnets.

Square patches at the backbone's coarsest stride (32 for ResNet and ConvNeXt) are masked at random; the encoder
(a timm convnet run sparsely, see polymodal.models.sparse_conv) sees only the visible ones; a light hierarchical
decoder fills the masked positions of every scale with mask tokens and predicts the pixels. The loss is the mean
squared error on masked patches, with each target patch normalised by its own mean and std (norm_pix_loss).
The backbone exports to timm (`backbone_state_dict`); evaluation uses its pooled last feature map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError
from polymodal.models.sparse_conv import SparseEncoder, upsample_mask
from polymodal.models.spark_decoder import SparKDecoder
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.objectives.classify import IMAGENET_MEAN, IMAGENET_STD


@register("spark")
class SparK(Objective):
    draws_images = True
    export_formats = (*Objective.export_formats, "timm")

    @dataclass
    class Config:
        # A timm convnet name that offers feature maps (ResNet, ConvNeXt, ...); built without downloading weights.
        model: str = "resnet18"
        model_kwargs: dict[str, Any] = field(default_factory=dict)
        # Fraction of patches masked (rounded to whole patches; at least one stays visible, one masked).
        mask_ratio: float = 0.6
        # Decoder width at the coarsest stride, halved at each upsampling (SparK: 512 for ResNet-50).
        decoder_width: int = 512
        # Predict each masked patch normalised by its own mean and std (SparK's target), else normalised pixels.
        norm_pix_loss: bool = True
        mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
        std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __init__(self, config: Config):
        super().__init__(config)
        if not 0 < config.mask_ratio < 1:
            raise ConfigError(f"config key 'objective.mask_ratio': must be between 0 and 1, got {config.mask_ratio}")
        self.encoder = SparseEncoder(config.model, **config.model_kwargs)
        try:
            self.decoder = SparKDecoder(self.encoder.reductions, self.encoder.channels, config.decoder_width,
                                        batch_norm=self.encoder.uses_batch_norm)
        except ValueError as exc:
            raise ConfigError(f"config key 'objective.decoder_width': {exc}") from None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1) * 255, persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Recomputation in backward would run after the mask's hooks are gone, i.e. densely: refuse.
        raise ConfigError("config key 'activation_checkpointing': spark applies its mask with per-call hooks, "
                          "which activation recomputation would miss")

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> normalised, in the dtype of the weights."""
        images = (rgb.to(self.mean.dtype) - self.mean) / self.std
        return images.to(self.decoder.head.weight.dtype)

    def visible_count(self, patches: int) -> int:
        """Patches left visible out of `patches`: the mask ratio rounded, at least one masked."""
        return min(round(patches * (1 - self.config.mask_ratio)), patches - 1)

    def check_run(self, cfg, zero_stage: int) -> None:
        super().check_run(cfg, zero_stage)
        self.check_image_size(cfg.data.image_size)

    def check_image_size(self, size: int) -> None:
        """The images (data.image_size, the one source of truth for their size) must tile into whole patches at
        the backbone's coarsest stride, with at least 2 visible: with 1, a sample's visible features are one
        position and BatchNorm's statistics degenerate; with 0, there is nothing to encode."""
        stride = self.encoder.stride
        side = size // stride
        if size % stride or self.visible_count(side * side) < 2:
            smallest = next((n * stride for n in range(2, 1024) if self.visible_count(n * n) >= 2), None)
            raise ConfigError(f"config key 'data.image_size': spark needs a multiple of {self.config.model}'s stride "
                              f"{stride} with at least 2 visible patches at mask_ratio {self.config.mask_ratio} "
                              f"(at least {smallest} px), got {size}")

    def random_visible(self, batch_size: int, height: int, width: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A bool mask [B, 1, H/stride, W/stride], True at the patches the encoder sees; the same number per
        sample, drawn uniformly."""
        stride = self.encoder.stride
        if height % stride or width % stride:
            raise ConfigError(f"config key 'data.image_size': {height}x{width} images are not a multiple of "
                              f"{self.config.model}'s stride {stride}")
        grid = (height // stride, width // stride)
        patches = grid[0] * grid[1]
        keep = self.visible_count(patches)
        if keep < 1:
            raise ConfigError(f"config key 'data.image_size': {height}x{width} images leave no visible patch at "
                              f"{self.config.model}'s stride {stride}")
        noise = torch.rand(batch_size, patches, generator=generator,
                           device=device if generator is None else generator.device).to(device)
        visible = torch.zeros(batch_size, patches, dtype=torch.bool, device=device)
        visible.scatter_(1, noise.argsort(dim=1)[:, :keep], True)
        return visible.view(batch_size, 1, *grid)

    def reconstruct(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The decoder's prediction [B, 3, H, W] of normalised `images` from their visible patches (in the
        target's space: per-patch normalised when norm_pix_loss)."""
        return self.decoder(self.encoder(images, visible), visible)

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, L, 3 * stride**2], patches in the row-major order of the mask grid."""
        return F.unfold(images, kernel_size=self.encoder.stride, stride=self.encoder.stride).transpose(1, 2)

    def _target(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target patches, with the per-patch mean and std that normalised them (0 and 1 without)."""
        patches = self._patches(images.float())
        if not self.config.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self.normalize(batch["rgb"])
        visible = self.random_visible(len(images), *images.shape[-2:], device=images.device)
        predicted = self._patches(self.reconstruct(images, visible).float())
        target, _, _ = self._target(images)
        masked = (~visible).flatten(1).to(predicted.dtype)  # [B, L]
        per_patch = (predicted - target).square().mean(dim=-1)
        loss = (per_patch * masked).sum() / masked.sum()
        return {"loss": loss, "mask_ratio": masked.mean().detach(),
                "visible_loss": ((per_patch * (1 - masked)).sum() / (1 - masked).sum()).detach()}

    def eval_encoder(self, name: str):
        from polymodal.eval.encoders import image_features_encoder

        return image_features_encoder(name, self)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled last feature map of the dense backbone, of normalised images (for linear probe and kNN)."""
        return self.encoder(images.to(self.decoder.head.weight.dtype))[-1].mean(dim=(2, 3))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The pretrained backbone for `timm.create_model(config.model)`: every weight but the classifier head,
        so `load_state_dict(..., strict=False)` reports only the head as missing."""
        return self.encoder.timm_state_dict()

    def timm_export(self, image_size: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.backbone_state_dict(), {"timm.model": self.config.model}

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], path: str | Path | None, max_images: int = 8,
                   seed: int = 0) -> Path | None:
        """A PNG with one row per image: input, masked input, reconstruction (visible patches pasted back).
        `path` None runs the forward only: the other ranks' part of a ZeRO-3 gather."""
        from torchvision.utils import save_image

        rgb = batch["rgb"][:max_images]
        images = self.normalize(rgb)
        generator = torch.Generator().manual_seed(seed)
        visible = self.random_visible(len(images), *images.shape[-2:], device=images.device, generator=generator)
        was_training = self.training
        self.eval()  # BatchNorm's running statistics must not learn from a picture
        try:
            predicted = self._patches(self.reconstruct(images, visible).float())
        finally:
            self.train(was_training)
        if path is None:
            return None
        _, mean, std = self._target(images)
        size = images.shape[-2:]
        reconstruction = F.fold((predicted * std + mean).transpose(1, 2), size, kernel_size=self.encoder.stride,
                                stride=self.encoder.stride)
        pixels = upsample_mask(visible, *size)
        images = images.float()
        columns = [images, images.masked_fill(~pixels, 0), torch.where(pixels, images, reconstruction)]
        rows = torch.stack(columns, dim=1).flatten(0, 1)  # image 0's three columns, then image 1's...
        unnormalised = (rows * self.std + self.mean) / 255
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(unnormalised.clamp(0, 1).cpu(), str(path), nrow=len(columns), padding=2)
        return path
