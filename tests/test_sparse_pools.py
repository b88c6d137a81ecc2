"""Layers that pool globally inside a block, under SparK's sparse encoder (issue 14): squeeze-excitation (timm's
SEModule with or without its max pool, EffectiveSEModule, EfficientNet's SqueezeExcite, the legacy SENet's, HGNet's
ESE), ECA, circular ECA, CBAM's channel attention and ConvNeXt-V2's GRN (either layout) pool over visible
positions only; masked pixels still never reach visible features; other global-pooling layers are refused. Real
CIFAR-10 test images at 128 px (a 4x4 mask at stride 32)."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from timm.layers import CecaModule, EcaModule, EffectiveSEModule, EvoNorm2dS0, FilterResponseNormTlu2d, SEModule
from timm.layers.cbam import ChannelAttn, LightChannelAttn
from timm.layers.grn import GlobalResponseNorm
from timm.layers.mlp import GlobalResponseNormMlp
from timm.models._efficientnet_blocks import SqueezeExcite as EfficientNetSqueezeExcite
from timm.models.hgnet import EseModule
from timm.models.senet import SEModule as LegacySEModule
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import cifar_test_images
from polymodal.data.errors import ConfigError
from polymodal.models.sparse_conv import SparseEncoder, upsample_mask

SIZE = 128
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(data_root) -> torch.Tensor:
    """Four CIFAR-10 test JPEGs, resized to 128 px and ImageNet-normalised."""
    return cifar_test_images(data_root, 4, SIZE)


@pytest.fixture(scope="module")
def visible() -> torch.Tensor:
    """A random 4x4 mask per image (about 60% masked), each with visible and masked positions."""
    visible = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.6
    visible[:, 0, 0, 0], visible[:, 0, 3, 3] = True, False
    return visible


def encoder(name: str, **kwargs) -> SparseEncoder:
    torch.manual_seed(0)
    model = SparseEncoder(name, **kwargs)
    for module in model.modules():
        if isinstance(module, GlobalResponseNormMlp):
            # timm starts GRN at zero weight and bias (the identity), and the Linear or 1x1 conv before it at zero
            # bias (so a channels-first GRN would see zeros at masked positions): weights as after some training.
            for tensor in (module.grn.weight, module.grn.bias, module.fc1.bias):
                torch.nn.init.normal_(tensor, std=0.5)
        if isinstance(module, _BatchNorm) and not module.weight.any():
            # timm's ResNets start each block's last norm at zero, which would give their SE layers zeros.
            torch.nn.init.ones_(module.weight)
    return model.train()  # batch statistics: the harder case


def attn(layer) -> dict:
    """timm ResNet-18 with `layer` as each block's attention (timm's create_attn)."""
    return {"block_args": {"attn_layer": layer}}


MODELS = {
    "convnextv2_atto": ("convnextv2_atto", {}),
    "seresnet18": ("seresnet18", {}),
    "resnet18-eca": ("resnet18", attn("eca")),
    "resnet18-cbam": ("resnet18", attn("cbam")),
    "efficientnet_b0": ("efficientnet_b0", {}),
}


@pytest.mark.parametrize("model", MODELS)
def test_masked_pixels_do_not_reach_visible_features(model, images, visible):
    name, kwargs = MODELS[model]
    sparse = encoder(name, **kwargs)
    pixels = upsample_mask(visible, SIZE, SIZE)
    other = torch.where(pixels, images, images.flip(0) * 3)  # other images' pixels, louder, in masked patches
    hooks = {m: (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in sparse.modules()}
    with torch.no_grad():
        ours, theirs = sparse(images, visible), sparse(other, visible)
    assert hooks == {m: (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in sparse.modules()}  # none left
    assert len(ours) == len(sparse.reductions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        masked = ~upsample_mask(visible, *a.shape[-2:])
        assert not a.masked_select(masked).any() and a.masked_select(~masked).abs().sum() > 0


def visible_mean(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Per sample and channel, the mean of x [B, C, H, W] over the positions where `at` [B, 1, H, W] is True."""
    return (x * at).sum(dim=(2, 3), keepdim=True) / at.sum(dim=(2, 3), keepdim=True)


def visible_max(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~at, float("-inf")).amax(dim=(2, 3), keepdim=True)


# Per attention layer: the model, the layer type, the submodule that receives the pooled vector, and what it
# should receive (the pooled vectors, in call order) given the layer m, its input x and its visible positions.
POOLS = {
    "SEModule": ("seresnet18", {}, SEModule, "fc1", lambda m, x, at: [visible_mean(x, at)]),
    "SEModule-maxpool": ("resnet18", attn(partial(SEModule, add_maxpool=True)), SEModule, "fc1",
                         lambda m, x, at: [0.5 * visible_mean(x, at) + 0.5 * visible_max(x, at)]),
    "EffectiveSEModule": ("resnet18", attn("ese"), EffectiveSEModule, "fc", lambda m, x, at: [visible_mean(x, at)]),
    "EcaModule": ("resnet18", attn("eca"), EcaModule, "conv",
                  lambda m, x, at: [visible_mean(x, at).view(len(x), 1, -1)]),
    "CecaModule": ("resnet18", attn("ceca"), CecaModule, "conv",  # after its circular padding
                   lambda m, x, at: [torch.nn.functional.pad(visible_mean(x, at).view(len(x), 1, -1), (m.padding,) * 2,
                                                          mode="circular")]),
    "EfficientNetSqueezeExcite": ("efficientnet_b0", {}, EfficientNetSqueezeExcite, "conv_reduce",
                                  lambda m, x, at: [visible_mean(x, at)]),
    "LegacySEModule": ("legacy_seresnet18", {}, LegacySEModule, "fc1", lambda m, x, at: [visible_mean(x, at)]),
    "EseModule": ("hgnet_tiny", {}, EseModule, "conv", lambda m, x, at: [visible_mean(x, at)]),
    "CbamChannelAttn": ("resnet18", attn("cbam"), ChannelAttn, "fc1",
                        lambda m, x, at: [visible_mean(x, at), visible_max(x, at)]),
    "LightCbamChannelAttn": ("resnet18", attn("lcbam"), LightChannelAttn, "fc1",
                             lambda m, x, at: [0.5 * visible_mean(x, at) + 0.5 * visible_max(x, at)]),
}


@pytest.mark.parametrize("layer", POOLS)
def test_squeeze_excitation_pools_visible_positions_only(layer, images, visible):
    name, kwargs, kind, first, expected_pools = POOLS[layer]
    sparse = encoder(name, **kwargs)
    seen: dict[torch.nn.Module, dict[str, list]] = {}
    layers = [m for m in sparse.modules() if type(m) is kind]
    assert layers
    for module in layers:
        record = seen[module] = {"input": [], "pooled": []}
        # Registered before the call, so these run before the encoder's own hooks: the layer's input as it comes.
        module.register_forward_pre_hook(lambda m, args, record=record: record["input"].append(args[0].clone()))
        getattr(module, first).register_forward_pre_hook(
            lambda m, args, record=record: record["pooled"].append(args[0].clone()))
    with torch.no_grad():
        sparse(images, visible)
    diluted = False
    for module in layers:
        (x,), pooled = seen[module]["input"], seen[module]["pooled"]
        at = upsample_mask(visible, *x.shape[-2:])
        expected = expected_pools(module, x, at)
        assert len(pooled) == len(expected)
        for got, want in zip(pooled, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # What a dense pool over all positions would have given differs (masked positions would count).
        diluted |= not torch.allclose(x.mean(dim=(2, 3), keepdim=True), visible_mean(x, at), atol=1e-4)
    assert diluted


@pytest.mark.parametrize("conv_mlp", [True, False], ids=["channels-first", "channels-last"])
def test_global_response_norm_uses_visible_positions_only(conv_mlp, images, visible):
    sparse = encoder("convnextv2_atto", conv_mlp=conv_mlp)
    layers = [m for m in sparse.modules() if isinstance(m, GlobalResponseNorm)]
    # After 1x1 convolutions (NCHW) or Linear layers (NHWC); either way the input at masked positions is not zero.
    assert layers and all(m.spatial_dim == ((2, 3) if conv_mlp else (1, 2)) for m in layers)
    seen = {}
    for module in layers:
        module.register_forward_pre_hook(lambda m, args: seen.setdefault(m, {}).update(input=args[0].clone()))
        module.register_forward_hook(lambda m, args, out: seen[m].update(output=out.clone()))
    with torch.no_grad():
        sparse(images, visible)
    for module in layers:
        x, y = seen[module]["input"], seen[module]["output"]
        if conv_mlp:  # the reference below works channels last
            x, y = x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)
        at = upsample_mask(visible, *x.shape[1:3]).permute(0, 2, 3, 1)  # [B, H, W, 1]
        assert x.masked_select(~at).abs().sum() > 0  # masked positions are not zero when GRN runs
        weight, bias = module.weight.view(1, 1, 1, -1), module.bias.view(1, 1, 1, -1)

        def grn(norm: torch.Tensor) -> torch.Tensor:
            return x + bias + weight * x * (norm / (norm.mean(dim=-1, keepdim=True) + module.eps))

        expected = grn((x.square() * at).sum(dim=(1, 2), keepdim=True).sqrt())
        keep = at.expand_as(x)
        torch.testing.assert_close(y[keep], expected[keep], rtol=1e-5, atol=1e-5)
        dense = grn(x.norm(p=2, dim=(1, 2), keepdim=True))
        assert not torch.allclose(y[keep], dense[keep], atol=1e-3)


def test_without_mask_it_is_timm(images, visible):
    """The hooks are per call: after a masked call, an unmasked one is timm's own model with the same weights."""
    for name, kwargs in [("seresnet18", {}), ("convnextv2_atto", {})]:
        sparse = encoder(name, **kwargs)
        with torch.no_grad():
            sparse(images, visible)  # in training mode: updates BatchNorm statistics from visible positions
        reference = timm.create_model(name, features_only=True, feature_cls="getter").eval()
        reference.load_state_dict(sparse.backbone.state_dict())
        sparse.eval()
        with torch.no_grad():
            for a, b in zip(sparse(images), reference(images)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, kind", [
    (attn("gc"), "GlobalContext"), (attn("coord"), "CoordAttn"), (attn("nl"), "NonLocalAttn"),
    (attn("sk"), "SelectiveKernelAttn"), (attn("splat"), "SplitAttn"),
    ({"norm_layer": FilterResponseNormTlu2d}, "FilterResponseNormTlu2d"), ({"norm_layer": EvoNorm2dS0}, "EvoNorm2dS0"),
], ids=["gc", "coord", "nl", "sk", "splat", "frn", "evonorm"])
def test_unsupported_global_pooling_layers_are_refused(kwargs, kind):
    with pytest.raises(ConfigError, match=f"'resnet18' has {kind} layers"):
        SparseEncoder("resnet18", **kwargs)
