"""Run a timm convnet on the visible positions of a masked image only, as if its convolutions were sparse.

SparK (Tian et al. 2023) pretrains convnets by masked image modelling. A dense convolution over a masked image
would see the masked area as zeros, and its batch statistics would count those zeros; SparK instead keeps every
layer's input zero at masked positions and normalises with statistics of visible positions only, which is what a
sparse (submanifold) convolution computes, with ordinary dense kernels.

The mask travels with the call: `SparseEncoder(images, visible)`. The original SparK keeps it in a module-global
variable, which leaks between models and calls (and breaks plain inference). Here hooks closing over the mask are
attached to the timm model for the duration of one call and removed when it returns, so the same modules, with
the same state dict keys as timm's model, run exactly as timm's when no mask is given.

What the hooks do, per layer kind:
- convolutions and windowed pooling mix neighbouring positions: their input is zeroed at masked positions. That
  is enough for every layer that acts on each position alone (activations, LayerNorm in either layout, Linear,
  layer scale): whatever such a layer leaves at a masked position is zeroed before any layer carries it sideways.
  LayerNorm (channels-last or timm's LayerNorm2d) therefore needs nothing: its statistics are per position.
- BatchNorm (any subclass, e.g. timm's BatchNormAct2d) sees only visible positions, packed as a batch of 1x1
  maps, so its batch statistics and running averages count visible positions only; results go back to their
  places, zeros elsewhere.
- GroupNorm is recomputed with per-sample group statistics over visible positions.
- Channel gates that pool globally inside a block, `x * gate(f(mean of x, max of x))`: squeeze-excitation (timm's
  SEModule, EffectiveSEModule, EfficientNet/MobileNet's SqueezeExcite, the legacy SENet's, HGNet's ESE), ECA and
  circular ECA, CBAM's channel attention. Their input gets, at each sample's masked positions, the mean of its
  visible positions (per channel), so their average pool is the visible positions' mean, their max pool the
  visible positions' max, and their output at visible positions is what it would be; masked positions keep
  something derived from visible ones only, zeroed before any layer carries it sideways.
- ConvNeXt-V2's GRN (GlobalResponseNorm, either layout): its input is zeroed at masked positions, so its spatial
  L2 norm is over visible positions only (masked positions are not zero there: a depthwise convolution's output
  at a masked position has visible neighbours).
Layers whose statistics or pooling mix positions in ways not listed here are refused by type (ConfigError): instance
norms, FilterResponseNorm, EvoNorm, and timm's other attention layers (gather-excite, global context, coordinate,
strip and local attention, selective kernel, split attention, non-local, bottleneck / halo / lambda attention,
FocalNet's modulation, the channels-last SqueezeExciteCl). A model-specific layer that pools in its own forward and
is not among these types is not detected.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import timm
import torch
from timm import layers
from timm.layers import bottleneck_attn, cbam, coord_attn, grn, halo_attn, lambda_layer, selective_kernel
from timm.layers import squeeze_excite
from timm.models import _efficientnet_blocks, focalnet, hgnet, senet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from polymodal.data.errors import ConfigError

_MIXING = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # timm's Conv2dSame, StdConv2d, MaxPool2dSame... subclass these
# x * gate(f(global average pool of x [and global max pool of x])), channels first (LightChannelAttn subclasses
# ChannelAttn).
_CHANNEL_GATES = (layers.SEModule, layers.EffectiveSEModule, _efficientnet_blocks.SqueezeExcite, senet.SEModule,
                  hgnet.EseModule, layers.EcaModule, layers.CecaModule, cbam.ChannelAttn)
# Layers whose statistics or pooling span all positions, which the hooks cannot restrict to visible ones.
_REFUSED = (nn.modules.instancenorm._InstanceNorm, layers.FilterResponseNormAct2d, layers.FilterResponseNormTlu2d,
            layers.EvoNorm2dB0, layers.EvoNorm2dB1, layers.EvoNorm2dB2, layers.EvoNorm2dS0, layers.EvoNorm2dS1,
            layers.EvoNorm2dS2, layers.GatherExcite, layers.GlobalContext, coord_attn.CoordAttn,
            coord_attn.SimpleCoordAttn, coord_attn.EfficientLocalAttn, coord_attn.StripAttn,
            selective_kernel.SelectiveKernelAttn, layers.SplitAttn, layers.NonLocalAttn, layers.BatNonLocalAttn,
            bottleneck_attn.BottleneckAttn, halo_attn.HaloAttn, lambda_layer.LambdaLayer, focalnet.FocalModulation,
            squeeze_excite.SqueezeExciteCl)


def upsample_mask(visible: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The bool mask [B, 1, h, w] repeated to [B, 1, height, width]; None when that is not a whole multiple (a
    globally pooled tensor, as in squeeze-excitation, which is left alone)."""
    h, w = visible.shape[-2:]
    if height % h or width % w:
        return None
    return visible.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)


def gather_visible(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The visible positions of `x` [B, C, H, W] as a batch of 1x1 maps [N, C, 1, 1], for BatchNorm."""
    return x.permute(0, 2, 3, 1)[visible[:, 0]][:, :, None, None]


def scatter_visible(values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_visible`: [N, C, 1, 1] back to [B, C, H, W], zeros at masked positions."""
    b, _, h, w = visible.shape
    out = values.new_zeros(b, h, w, values.shape[1])
    out[visible[:, 0]] = values.flatten(1)
    return out.permute(0, 3, 1, 2)


def batch_norm_visible(norm: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """A BatchNorm module applied with statistics of the visible positions only; zeros at masked ones."""
    return scatter_visible(norm(gather_visible(x, visible)), visible)


def group_norm_visible(norm: nn.GroupNorm, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`norm` with each sample's group statistics over its visible positions; zeros at masked ones."""
    b, c, h, w = x.shape
    groups = x.view(b, norm.num_groups, c // norm.num_groups, h, w)
    weights = visible.to(x.dtype).view(b, 1, 1, h, w)
    count = weights.sum(dim=(2, 3, 4), keepdim=True) * groups.shape[2]
    mean = (groups * weights).sum(dim=(2, 3, 4), keepdim=True) / count
    var = ((groups - mean).square() * weights).sum(dim=(2, 3, 4), keepdim=True) / count
    out = ((groups - mean) * torch.rsqrt(var + norm.eps)).view(b, c, h, w)
    if norm.affine:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    # timm's GroupNormAct follows the normalisation with dropout and an activation.
    for then in (getattr(norm, "drop", None), getattr(norm, "act", None)):
        if then is not None:
            out = then(out)
    return out.masked_fill(~visible, 0)


def fill_visible_mean(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`x` [B, C, H, W] with each sample's masked positions set to the mean of its visible positions, per channel:
    a global average pool of the result is the visible positions' mean, a global max pool their max."""
    count = visible.sum(dim=(2, 3), keepdim=True).clamp(min=1).to(x.dtype)
    mean = x.masked_fill(~visible, 0).sum(dim=(2, 3), keepdim=True) / count
    return torch.where(visible, x, mean)


class _MaskedCall:
    """The hooks of one masked forward call. They close over this call's mask; nothing outlives the call."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible
        self._sizes: dict[tuple[int, int], torch.Tensor | None] = {}
        # BatchNorm modules whose input the pre-hook packed, with the mask to unpack their output by.
        self._packed: dict[nn.Module, list[torch.Tensor | None]] = {}

    def at(self, height: int, width: int) -> torch.Tensor | None:
        if (height, width) not in self._sizes:
            self._sizes[height, width] = upsample_mask(self.visible, height, width)
        return self._sizes[height, width]

    def zero_masked_input(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        visible = self.at(*x.shape[-2:])
        return args if visible is None else (x.masked_fill(~visible, 0), *rest)

    def pack_visible(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        visible = self.at(*x.shape[-2:]) if x.dim() == 4 else None
        self._packed.setdefault(module, []).append(visible)
        return args if visible is None else (gather_visible(x, visible), *rest)

    def unpack_visible(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        visible = self._packed[module].pop()
        return output if visible is None else scatter_visible(output, visible)

    def pool_visible(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        visible = self.at(*x.shape[-2:])
        return args if visible is None else (fill_visible_mean(x, visible), *rest)

    def zero_masked_response(self, module: grn.GlobalResponseNorm, args: tuple) -> tuple:
        x, *rest = args
        channels_last = tuple(module.spatial_dim) == (1, 2)
        visible = self.at(*(x.shape[1:3] if channels_last else x.shape[-2:]))
        if visible is None:
            return args
        return (x.masked_fill(~(visible.permute(0, 2, 3, 1) if channels_last else visible), 0), *rest)

    def renormalise_groups(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # GroupNorm keeps no running statistics, so recomputing from its input replaces the dense result exactly.
        visible = self.at(*args[0].shape[-2:])
        return output if visible is None else group_norm_visible(module, args[0], visible)


class SparseEncoder(nn.Module):
    """A timm convnet's feature maps (`features_only`), dense by default, sparse over `visible` when given.

    `self.backbone` is timm's feature-getter wrapper around the plain model (`forward_intermediates`), so its
    state dict is timm's under a `model.` prefix, minus the pruned classifier head: `timm_state_dict()` loads into
    `timm.create_model(name)`. (timm's default FeatureListNet renames flattened modules, `stages.0` to
    `stages_0`, which would need a mapping back.)
    """

    def __init__(self, name: str, **model_kwargs):
        super().__init__()
        if name not in timm.list_models():
            raise ConfigError(f"config key 'objective.model': {name!r} is not a timm model name")
        self.backbone = timm.create_model(name, pretrained=False, features_only=True, feature_cls="getter",
                                          **model_kwargs)
        if not hasattr(self.backbone.model, "forward_intermediates"):
            raise ConfigError(f"config key 'objective.model': timm model {name!r} has no forward_intermediates, "
                              "which the sparse encoder reads its feature maps with")
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.stride = max(self.reductions)
        self._mixing = [m for m in self.backbone.modules() if isinstance(m, _MIXING)]
        self._batch_norms = [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]
        self._group_norms = [m for m in self.backbone.modules() if isinstance(m, nn.GroupNorm)]
        self._channel_gates = [m for m in self.backbone.modules() if isinstance(m, _CHANNEL_GATES)]
        self._response_norms = [m for m in self.backbone.modules() if isinstance(m, grn.GlobalResponseNorm)]
        unsupported = sorted({type(m).__name__ for m in self.backbone.modules() if isinstance(m, _REFUSED)})
        if unsupported:
            raise ConfigError(f"config key 'objective.model': {name!r} has {', '.join(unsupported)} layers, whose "
                              "statistics or pooling the sparse encoder cannot restrict to visible positions")

    @property
    def uses_batch_norm(self) -> bool:
        return bool(self._batch_norms)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps, finest first. `visible`: bool [B, 1, H/stride, W/stride], True where the encoder may
        look; masked positions of the input and of every returned map are zero."""
        if visible is None:
            return self.backbone(images)
        height, width = images.shape[-2:]
        if (height, width) != (visible.shape[-2] * self.stride, visible.shape[-1] * self.stride):
            raise ValueError(f"images of {height}x{width} pixels do not match a {visible.shape[-2]}x"
                             f"{visible.shape[-1]} mask at stride {self.stride}")
        with self._hooked(_MaskedCall(visible)) as call:
            features = self.backbone(images.masked_fill(~call.at(height, width), 0))
        return [f.masked_fill(~call.at(*f.shape[-2:]), 0) for f in features]

    @contextmanager
    def _hooked(self, call: _MaskedCall) -> Iterator[_MaskedCall]:
        handles = [m.register_forward_pre_hook(call.zero_masked_input) for m in self._mixing]
        handles += [m.register_forward_pre_hook(call.pack_visible) for m in self._batch_norms]
        handles += [m.register_forward_hook(call.unpack_visible) for m in self._batch_norms]
        handles += [m.register_forward_hook(call.renormalise_groups) for m in self._group_norms]
        handles += [m.register_forward_pre_hook(call.pool_visible) for m in self._channel_gates]
        handles += [m.register_forward_pre_hook(call.zero_masked_response) for m in self._response_norms]
        try:
            yield call
        finally:
            for handle in handles:
                handle.remove()

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under timm's own names (no classifier head)."""
        return {k.removeprefix("model."): v for k, v in self.backbone.state_dict().items()}
