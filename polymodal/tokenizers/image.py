"""Image-like tokenizers: a convolutional (or ViT) encoder, a quantiser, a convolutional (or ViT) decoder.

The quantisers come from vector-quantize-pytorch (maintained, MIT): FSQ (finite scalar quantisation; levels
[8,5,5,5] = 1,000 codes, [8,8,8,5,5,5] = 64,000), and VQ with a cosine-similarity codebook of l2-normalised codes,
EMA updates, k-means initialisation, dead-code restart and a commitment loss. DESIGN.md records a probe of both on
CIFAR-10. Categorical maps (segmentation-like) go in as class ids and come out as logits (cross-entropy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.tokenizers.base import Tokenizer


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a skip: no BatchNorm, so no running statistics to keep in step."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def encoder(in_channels: int, width: int, steps: int, latent: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    for _ in range(steps):
        layers += [ResBlock(width), nn.Conv2d(width, width, 4, stride=2, padding=1)]
    return nn.Sequential(*layers, ResBlock(width), nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, latent, 1))


def decoder(latent: int, width: int, steps: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(latent, width, 3, padding=1), ResBlock(width)]
    for _ in range(steps):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1),
                   ResBlock(width)]
    return nn.Sequential(*layers, nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1))


class ViTCoder(nn.Module):
    """A ViT encoder or decoder on the grid of tokens (our transformer blocks, 2-D sin-cos positions).

    Encoder: image [B, C, H, W] -> patches of `patch` pixels -> blocks -> latents [B, out, H/patch, W/patch].
    Decoder: latents [B, C, h, w] -> blocks -> `patch` x `patch` pixels per token -> image [B, out, h*patch, w*patch].
    """

    def __init__(self, in_channels: int, out_channels: int, patch: int, width: int, depth: int, heads: int,
                 decode: bool):
        super().__init__()
        from polymodal.models.transformer import Transformer

        self.patch, self.decode, self.width = patch, decode, width
        self.embed = nn.Conv2d(in_channels, width, 1 if decode else patch, stride=1 if decode else patch)
        self.blocks = Transformer(width, depth, heads)
        self.out = nn.Linear(width, out_channels * (patch * patch if decode else 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from polymodal.models.transformer import grid_positions, sincos_2d

        x = self.embed(x)
        b, _, h, w = x.shape
        rows, cols = grid_positions(h, w, x.device)
        tokens = x.flatten(2).transpose(1, 2) + sincos_2d(rows, cols, self.width).to(x.dtype)
        y = self.out(self.blocks(tokens)).transpose(1, 2).reshape(b, -1, h, w)
        return F.pixel_shuffle(y, self.patch) if self.decode else y


class ImageTokenizer(Tokenizer, nn.Module):
    """Images [B, C, H, W] in [-1, 1] (or class ids [B, H, W] with `classes`) <-> token ids [B, H/f, W/f]."""

    name = "image"

    def __init__(self, quantizer: str = "fsq", channels: int = 3, classes: int = 0, width: int = 64,
                 downsample: int = 4, levels: list[int] | None = None, codebook_size: int = 1024,
                 codebook_dim: int = 8, kmeans_init: bool = True, dead_code_threshold: float = 2.0,
                 ema_decay: float = 0.8, commitment_weight: float = 0.25, backbone: str = "conv",
                 vit_depth: int = 4, vit_heads: int = 4):
        nn.Module.__init__(self)
        if quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer must be 'fsq' or 'vq' (got {quantizer!r})")
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2 (got {downsample})")
        if width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm's groups, sin-cos positions; got {width})")
        if backbone not in ("conv", "vit"):
            raise ValueError(f"backbone must be 'conv' or 'vit' (got {backbone!r})")
        if backbone == "vit" and width % vit_heads:
            raise ValueError(f"width {width} is not divisible by vit_heads {vit_heads}")
        self.settings = dict(quantizer=quantizer, channels=channels, classes=classes, width=width,
                             downsample=downsample, levels=list(levels or [8, 5, 5, 5]), codebook_size=codebook_size,
                             codebook_dim=codebook_dim, kmeans_init=kmeans_init,
                             dead_code_threshold=dead_code_threshold, ema_decay=ema_decay,
                             commitment_weight=commitment_weight)
        if backbone == "vit":  # recorded only when used, so conv tokenizers keep their fingerprints
            self.settings.update(backbone=backbone, vit_depth=vit_depth, vit_heads=vit_heads)
        from vector_quantize_pytorch import FSQ, VectorQuantize

        steps = int(math.log2(downsample))
        latent = len(self.settings["levels"]) if quantizer == "fsq" else codebook_dim
        self.downsample, self.classes = downsample, classes
        self.embed_classes = nn.Embedding(classes, channels) if classes else None
        if backbone == "vit":
            self.encoder = ViTCoder(channels, latent, downsample, width, vit_depth, vit_heads, decode=False)
            self.decoder = ViTCoder(latent, classes or channels, downsample, width, vit_depth, vit_heads, decode=True)
        else:
            self.encoder = encoder(channels, width, steps, latent)
            self.decoder = decoder(latent, width, steps, classes or channels)
        if quantizer == "fsq":
            self.quantizer = FSQ(levels=self.settings["levels"])
        else:
            self.quantizer = VectorQuantize(dim=latent, codebook_size=codebook_size, use_cosine_sim=True,
                                            kmeans_init=kmeans_init, threshold_ema_dead_code=dead_code_threshold,
                                            decay=ema_decay, commitment_weight=commitment_weight)

    def tokenizer_config(self) -> dict:
        return dict(self.settings)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    def grid(self, size: int) -> tuple[int, int]:
        return size // self.downsample, size // self.downsample

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_classes is None:
            return x
        return self.embed_classes(x.long()).permute(0, 3, 1, 2)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised latents [B, d, h, w], ids [B, h, w], auxiliary loss: VQ's commitment, 0 for FSQ)."""
        z = self.encoder(self._inputs(x))
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.settings["quantizer"] == "fsq":
            q, ids = self.quantizer(flat)
            aux = z.new_zeros(())
        else:
            q, ids, aux = self.quantizer(flat)
        return q.reshape(b, h, w, d).permute(0, 3, 1, 2), ids.reshape(b, h, w).long(), aux.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction: images in [-1, 1] scale, or class logits; ids; auxiliary loss)."""
        q, ids, aux = self.quantize(x)
        return self.decoder(q), ids, aux

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images in [-1, 1] (class ids for categorical maps)."""
        if ids.dim() != 3:
            raise ValueError(f"token ids must be a [batch, h, w] grid (got shape {tuple(ids.shape)})")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}")
        b, h, w = ids.shape
        out = self.decoder(self._codes(ids.reshape(b, h * w)).reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return out.argmax(1) if self.classes else out.clamp(-1, 1)

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] -> their quantizer codes [B, N, d]."""
        if self.settings["quantizer"] == "fsq":
            return self.quantizer.indices_to_codes(ids)
        return self.quantizer.get_output_from_indices(ids)

    @torch.no_grad()
    def decode_distribution(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-token distributions over the codes [B, h, w, vocab] -> images in [-1, 1]: the decoder applied to each
        token's expected code. Where a model is unsure, this averages the codes it weighs instead of committing to
        one, so it is the decode to score by squared error (PSNR); `decode` of sampled or argmax ids is the one to
        look at."""
        if self.classes:
            raise ValueError("a categorical map's tokenizer decodes ids, not distributions")
        table = self._codes(torch.arange(self.vocab_size, device=probs.device)[None])[0]  # [vocab, d]
        codes = probs.to(table.dtype) @ table  # [B, h, w, d]
        return self.decoder(codes.permute(0, 3, 1, 2)).clamp(-1, 1)

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.classes:
            return F.cross_entropy(recon.float(), target.long())
        return F.mse_loss(recon.float(), target.float())
