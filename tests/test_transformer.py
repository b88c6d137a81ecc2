"""The transformer blocks: timm parity (our ViT exports to timm with identical outputs), packed equals padded,
RoPE's relative positions, activation checkpointing that really recomputes, cross-attention decoders."""

from __future__ import annotations

import pytest
import timm
import torch

from polymodal.models.attention import Packing
from polymodal.models.transformer import Block, RotaryEmbedding2D, Transformer, grid_positions, sincos_2d
from polymodal.models.vit import VisionTransformer, timm_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qk_norm, layer_scale", [(False, None), (True, 1e-2)])
def test_our_vit_exports_to_timm_with_identical_outputs(qk_norm, layer_scale):
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7,
                             qk_norm=qk_norm, layer_scale=layer_scale).eval()
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                               depth=2, num_heads=4, num_classes=7, qkv_bias=True, qk_norm=qk_norm,
                               init_values=layer_scale, global_pool="token").eval()
    missing, unexpected = theirs.load_state_dict(timm_state_dict(ours), strict=True), None
    del missing, unexpected
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_timm_style_initialisation_happens_in_the_constructor():
    torch.manual_seed(0)
    stack = Transformer(256, depth=2, heads=4)
    w = stack.blocks[0].mlp.fc1.weight
    assert abs(float(w.std()) - 0.02) < 0.002 and float(w.abs().max()) < 0.15  # timm's: std 0.02, cut at +-2
    assert float(stack.blocks[0].attn.qkv.bias.abs().max()) == 0.0


def test_packed_vit_with_per_sample_patch_dropout_equals_each_sample_alone():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    x = images(3)
    keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.3], [0.6], [1.0]])
    with torch.no_grad():
        packed = vit(x, keep)
        for i in range(3):
            tokens = vit.patch_tokens(x[i:i + 1])[:, keep[i]]
            alone = vit.blocks(torch.cat([vit.cls_token[None], tokens], 1))
            torch.testing.assert_close(packed[i], vit.head(alone[0, 0]), atol=1e-5, rtol=1e-5)
    assert keep.sum(1).unique().numel() == 3  # the samples really kept different counts


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_decoder_cross_attention_packed_equals_padded_per_sample(mlp):
    torch.manual_seed(0)
    decoder = Transformer(32, depth=2, heads=4, cross_attention=True, mlp=mlp, bias=False, qk_norm=True).eval()
    lq, lk = [3, 5], [4, 2]
    x, ctx = torch.randn(sum(lq), 32), torch.randn(sum(lk), 32)
    with torch.no_grad():
        packed = decoder(x, Packing.from_lengths(lq), context=ctx, context_packing=Packing.from_lengths(lk))
        for i in range(2):
            xs, cs = x[sum(lq[:i]):sum(lq[:i + 1])], ctx[sum(lk[:i]):sum(lk[:i + 1])]
            alone = decoder(xs[None], context=cs[None])[0]
            torch.testing.assert_close(packed[sum(lq[:i]):sum(lq[:i + 1])], alone, atol=1e-5, rtol=1e-5)


def test_rope_2d_depends_on_relative_positions_only_and_runs_packed():
    rope = RotaryEmbedding2D(16)
    q, k = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    pos = torch.randint(0, 8, (5, 2))
    shift = torch.tensor([3, -2])
    score = (rope(q, pos) * rope(k, pos.flip(0))).sum(-1)
    shifted = (rope(q, pos + shift) * rope(k, pos.flip(0) + shift)).sum(-1)
    torch.testing.assert_close(score, shifted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rope(q, pos), q)  # it rotates at all
    padded = rope(q[None], pos[None])[0]  # [B, L, H, D] gives the same as packed [T, H, D]
    torch.testing.assert_close(padded, rope(q, pos))
    block = Block(32, 2).eval()
    rows, cols = grid_positions(2, 3)
    with torch.no_grad():
        out = block(torch.randn(6, 32), Packing.from_lengths([6]), rope=RotaryEmbedding2D(16),
                    positions=torch.stack([rows, cols], -1))
    assert out.shape == (6, 32) and torch.isfinite(out).all()


def test_sincos_2d_is_mae_layout():
    rows, cols = grid_positions(4, 4)
    emb = sincos_2d(rows, cols, 16)
    assert emb.shape == (16, 16)
    torch.testing.assert_close(emb[5, :4], torch.tensor([1.0, 0.1, 0.01, 0.001]).mul(1).sin())  # row 1
    assert torch.equal(emb[:4, :8], emb[0:1, :8].expand(4, 8))  # the first half follows the row only


def test_grad_checkpointing_recomputes_every_block_and_keeps_the_gradients():
    from polymodal.pretrain.objectives import build_objective

    def run(checkpointing: bool):
        torch.manual_seed(0)
        objective = build_objective({"name": "classify", "model": "polymodal-vit",
                                     "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                                      "depth": 3, "num_heads": 2, "drop_path_rate": 0.1}})
        if checkpointing:
            objective.set_grad_checkpointing(True)  # what the engine calls for activation_checkpointing
        calls = []
        for block in objective.model.blocks.blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))  # a pre-hook: recomputation may stop early
        batch = {"rgb": (images(4) * 40 + 128).clamp(0, 255), "label": torch.tensor([0, 1, 2, 3]),
                 "__key__": list("abcd")}
        torch.manual_seed(1)
        objective(batch)["loss"].backward()
        return len(calls), [p.grad.clone() for p in objective.parameters() if p.grad is not None]

    plain_calls, plain_grads = run(False)
    ckpt_calls, ckpt_grads = run(True)
    assert plain_calls == 3 and ckpt_calls == 6  # each block ran again in backward
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
