"""SparK's light hierarchical decoder: sparse encoder feature maps in, a dense image out.

Each encoder scale is "densified" (normalised over its visible positions, masked positions filled with a learned
mask token of that scale, projected to the decoder's width there), then a UNet-like stack of upsampling blocks
runs from the coarsest scale to full resolution, adding each densified scale where the resolutions meet.
Layer shapes follow the reference code (github.com/keyu-tian/SparK, pretrain/decoder.py and spark.py).
"""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from polymodal.models.sparse_conv import batch_norm_visible, upsample_mask


class Densify(nn.Module):
    """One encoder scale made dense for the decoder."""

    def __init__(self, channels: int, width: int, kernel_size: int, batch_norm: bool):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if batch_norm else LayerNorm2d(channels)
        # One dimension, so the engine's optimizer gives it no weight decay; shaped [1, C, 1, 1] where used.
        self.mask_token = nn.Parameter(trunc_normal_(torch.zeros(channels), std=0.02, a=-0.02, b=0.02))
        self.proj = nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        visible = upsample_mask(visible, *features.shape[-2:])
        if isinstance(self.norm, nn.BatchNorm2d):  # batch statistics of visible positions only
            features = batch_norm_visible(self.norm, features, visible)
        else:  # per-position statistics: the masked positions are overwritten just below
            features = self.norm(features)
        token = self.mask_token.to(features.dtype).view(1, -1, 1, 1)
        return self.proj(torch.where(visible, features, token))


class UpBlock(nn.Sequential):
    """Double the resolution, then two 3x3 conv + BatchNorm layers (SparK's UNetBlock)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )


class SparKDecoder(nn.Module):
    """Feature maps at `reductions` (strides, with `channels`) -> a 3-channel image at full resolution.

    The decoder halves its width at every doubling of resolution, from `width` at the coarsest stride.
    `batch_norm` picks the densifying norm: SparK uses BatchNorm for BatchNorm backbones (ResNet) and LayerNorm
    for LayerNorm ones (ConvNeXt).
    """

    def __init__(self, reductions: list[int], channels: list[int], width: int, batch_norm: bool):
        super().__init__()
        stride = max(reductions)
        blocks = round(math.log2(stride))
        if 2 ** blocks != stride:
            raise ValueError(f"the decoder needs a power-of-two stride, got {stride}")
        if width < 2 ** blocks:
            raise ValueError(f"decoder width {width} cannot be halved {blocks} times")
        widths = [width // 2 ** i for i in range(blocks + 1)]
        # Block i starts at stride `stride / 2**i`; the encoder scale of that stride (if any) is added there.
        self.strides = [stride // 2 ** i for i in range(blocks)]
        self.densify = nn.ModuleDict({
            str(r): Densify(c, widths[self.strides.index(r)], 1 if r == stride else 3, batch_norm)
            for r, c in zip(reductions, channels) if r in self.strides})
        self.blocks = nn.ModuleList(UpBlock(cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], 3, kernel_size=1)
        self.reductions = list(reductions)
        # The reference's initialisation: small 3x3/1x1 weights make the first predictions close to zero (the
        # patch mean under norm_pix_loss) instead of a random image with a loss well above 1.
        for module in [*self.blocks.modules(), self.head]:
            if type(module) is nn.Conv2d:
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """`features` in the order of `reductions`; `visible` at the coarsest stride."""
        by_stride = dict(zip(self.reductions, features))
        x = 0
        for stride, block in zip(self.strides, self.blocks):
            if str(stride) in self.densify:
                x = x + self.densify[str(stride)](by_stride[stride], visible)
            x = block(x)
        return self.head(x)
