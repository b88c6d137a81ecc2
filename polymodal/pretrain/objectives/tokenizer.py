"""Training image tokenizers on the engine: objectives `fsq` and `vqvae` (polymodal/tokenizers/image.py).

The loss is the reconstruction error (MSE on images scaled to [-1, 1]; cross-entropy for categorical maps) plus
VQ's commitment loss. Logged per step: PSNR, the share of the codebook used over the last `usage_window` batches,
and the perplexity of this batch's codes; SSIM (torchmetrics) for images. Like every objective: ZeRO, bf16 and
exact resume come from the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymodal.data.errors import ConfigError
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.tokenizers.image import ImageTokenizer


@dataclass
class TokenizerConfig:
    # The image-like modality to tokenize (a batch key: rgb, or a derived map).
    modality: str = "rgb"
    channels: int = 3
    # Categorical maps (segmentation-like): the number of classes (0: a continuous image).
    classes: int = 0
    width: int = 64
    # Tokens per side = image size / downsample (a power of 2).
    downsample: int = 4
    # Codes seen over this many recent batches count as used.
    usage_window: int = 50
    # conv (ResNet-style convolutions) or vit (our transformer blocks on the token grid, vit_depth each side).
    backbone: str = "conv"
    vit_depth: int = 4
    vit_heads: int = 4


@dataclass
class FSQConfig(TokenizerConfig):
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])


@dataclass
class VQConfig(TokenizerConfig):
    codebook_size: int = 1024
    codebook_dim: int = 8
    kmeans_init: bool = True
    # Codes whose EMA cluster size falls below this are restarted from the batch (0: never).
    dead_code_threshold: float = 2.0
    ema_decay: float = 0.8
    commitment_weight: float = 0.25


class TokenizerObjective(Objective):
    draws_images = True
    quantizer = ""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        kwargs = {k: v for k, v in vars(config).items() if k not in ("modality", "usage_window")}
        try:
            self.tokenizer_model = ImageTokenizer(self.quantizer, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"config key 'objective': {exc}") from None
        self.register_buffer("seen", torch.zeros(config.usage_window, self.tokenizer_model.vocab_size,
                                                 dtype=torch.bool), persistent=False)
        self.register_buffer("slot", torch.zeros((), dtype=torch.long), persistent=False)

    def check_run(self, cfg, zero_stage: int) -> None:
        super().check_run(cfg, zero_stage)
        if cfg.data.image_size % self.tokenizer_model.downsample:
            raise ConfigError(f"config key 'data.image_size': {cfg.data.image_size} is not a multiple of "
                              f"objective.downsample {self.tokenizer_model.downsample}")

    def mutable_buffers(self) -> list[torch.Tensor]:
        """VQ's EMA codebook state changes in forward: a skipped step puts it back."""
        return super().mutable_buffers() + [b for b in self.tokenizer_model.quantizer.buffers()
                                            if b.is_floating_point()]

    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        name = self.config.modality
        if name not in batch:
            raise ConfigError(f"config key 'objective.modality': the batch has no {name!r} (data.modalities)")
        x = batch[name]
        if self.config.classes:  # class ids [B, H, W]; a decoded map may come as one channel [B, 1, H, W]
            return (x.squeeze(1) if x.dim() == 4 and x.shape[1] == 1 else x).long()
        dtype = next(self.tokenizer_model.parameters()).dtype
        return (x.float() / 127.5 - 1.0).to(dtype) if x.dtype == torch.uint8 else x.to(dtype)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)
        recon, ids, aux = self.tokenizer_model(x)
        rec = self.tokenizer_model.reconstruction_loss(recon, x)
        metrics = {"loss": rec + aux, "recon_loss": rec.detach()}
        if not self.config.classes:  # images span 2 (from -1 to 1): PSNR = 10 log10(2^2 / MSE)
            metrics["psnr"] = (10 * torch.log10(4.0 / rec.detach().clamp_min(1e-10)))
            if x.shape[-1] >= 11:  # SSIM's Gaussian window is 11 pixels wide
                from torchmetrics.functional.image import structural_similarity_index_measure as ssim

                with torch.no_grad():
                    metrics["ssim"] = ssim(recon.detach().float().clamp(-1, 1), x.float(), data_range=2.0)
        with torch.no_grad():
            counts = torch.bincount(ids.flatten(), minlength=self.tokenizer_model.vocab_size).float()
            p = counts / counts.sum()
            metrics["perplexity"] = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
            if self.training:
                self.seen[self.slot % len(self.seen)] = counts > 0
                self.slot += 1
            metrics["codebook_usage"] = self.seen.any(0).float().mean()
        return metrics

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], path: str | Path | None, max_images: int = 8) -> Path | None:
        """A PNG with two rows: inputs, then their reconstructions from tokens."""
        from torchvision.utils import save_image

        x = self.inputs(batch)[:max_images]
        was_training = self.training
        self.eval()
        try:
            recon = self.tokenizer_model.decode(self.tokenizer_model.encode(x))
        finally:
            self.train(was_training)
        if path is None or self.config.classes:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(((torch.cat([x, recon]).float() + 1) / 2).clamp(0, 1).cpu(), str(path), nrow=len(x), padding=2)
        return path


@register("fsq")
class FSQTokenizer(TokenizerObjective):
    Config = FSQConfig
    quantizer = "fsq"


@register("vqvae")
class VQVAETokenizer(TokenizerObjective):
    Config = VQConfig
    quantizer = "vq"
