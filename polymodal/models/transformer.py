"""The transformer blocks every transformer of ours uses, on `polymodal.models.attention`.

- `Block`: pre-norm self-attention, optional cross-attention, an MLP (GELU or SwiGLU); bias on/off, QK-norm,
  LayerScale, drop-path. Parameter names follow timm's ViT `Block` (norm1, attn.qkv, attn.q_norm, attn.proj, ls1,
  norm2, mlp.fc1, mlp.fc2, ls2), so an encoder stack exports to timm by its state dict.
- `Transformer`: a stack of blocks and a final norm, with `set_grad_checkpointing` (the engine's
  `activation_checkpointing`) and timm's ViT initialisation.
- Position embeddings that take each token's position, so packed input needs no padding: 1-D and 2-D sin-cos,
  learned, and 2-D RoPE (applied to q and k inside attention).

Layer norms use eps 1e-6, as timm's ViT. Every block takes padded `[B, L, C]` or packed `[T, C]` tokens with a `Packing` (cumulative lengths).
Weights are initialised inside each layer's own constructor (`Linear.reset_parameters`), so a model built under
`deepspeed.zero.Init` (ZeRO-3) initialises each parameter before it is partitioned and is never whole on a rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale
from torch import nn
from torch.utils.checkpoint import checkpoint

from polymodal.models.attention import Packing, attention


@dataclass
class KVCache:
    """One attention layer's keys and values for incremental decoding, [B, H, L, D]: self-attention appends each
    new token's; cross-attention computes the context's once and keeps them."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class Linear(nn.Linear):
    """timm's ViT initialisation (truncated normal, std 0.02; zero bias), done in the constructor. timm applies it
    to a built model afterwards, which under ZeRO-3's zero.Init would touch already-partitioned parameters."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """Token embeddings with the truncated normal (std 0.02) of 4M and timm, set in the constructor (see Linear)."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)


class Mlp(nn.Module):
    """GELU MLP with timm's names (fc1, fc2). Ours, not timm.layers.Mlp, for the constructor-time init above."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(dim, hidden, bias=bias), nn.GELU(), Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """SwiGLU MLP (4M, LLaMA) with timm's names (fc1_g, fc1_x, fc2)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1_g, self.fc1_x = Linear(dim, hidden, bias=bias), Linear(dim, hidden, bias=bias)
        self.fc2, self.drop = Linear(hidden, dim, bias=bias), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.silu(self.fc1_g(x)) * self.fc1_x(x))))


class Attention(nn.Module):
    """Multi-head attention on our attention function. Self-attention projects q, k, v from `x` (timm's `qkv`);
    cross-attention projects q from `x` and k, v from `context` (`q`, `kv`)."""

    def __init__(self, dim: int, heads: int, bias: bool = True, qk_norm: bool = False, cross: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.cross, self.backend = heads, dim // heads, cross, backend
        if cross:
            self.q, self.kv = Linear(dim, dim, bias=bias), Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj, self.attn_drop, self.proj_drop = Linear(dim, dim, bias=bias), attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, packing: Packing | None = None, *, context: torch.Tensor | None = None,
                context_packing: Packing | None = None, causal: Any = False, mask: torch.Tensor | None = None,
                rope: RotaryEmbedding2D | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        split = lambda t, n: t.unflatten(-1, (n, self.heads, self.head_dim)).unbind(-3)  # noqa: E731
        if self.cross:
            (q,), (k, v) = split(self.q(x), 1), split(self.kv(context), 2)
        else:
            q, k, v = split(self.qkv(x), 3)
            context_packing = packing
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # per-token positions: works the same on packed tokens
            q = rope(q, positions)
            if not self.cross:
                k = rope(k, positions)
        if packing is None:  # [B, L, H, D] -> [B, H, L, D]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = attention(q, k, v, causal=causal, mask=mask, dropout_p=self.attn_drop if self.training else 0.0,
                            backend=self.backend).transpose(1, 2)
        else:
            out = attention(q, k, v, causal=causal, cu_seqlens_q=packing.cu_seqlens,
                            cu_seqlens_k=context_packing.cu_seqlens, max_seqlen_q=packing.max_seqlen,
                            max_seqlen_k=context_packing.max_seqlen,
                            dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def step(self, x: torch.Tensor, cache: KVCache, context: torch.Tensor | None = None,
             context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Incremental decoding, padded `[B, n, C]`: self-attention adds the n new tokens' keys and values to
        `cache` and attends causally over all of them; cross-attention projects `context` into `cache` on its
        first call and reuses it after."""
        split = lambda t, n: t.unflatten(-1, (n, self.heads, self.head_dim)).unbind(-3)  # noqa: E731
        heads_first = lambda t: t.transpose(1, 2)  # noqa: E731 - [B, L, H, D] -> [B, H, L, D]
        mask = None
        if self.cross:
            (q,) = split(self.q(x), 1)
            if cache.k is None:
                k, v = split(self.kv(context), 2)
                cache.k, cache.v = heads_first(self.k_norm(k)), heads_first(v)
            mask = context_mask
        else:
            q, k, v = split(self.qkv(x), 3)
            k, v = heads_first(self.k_norm(k)), heads_first(v)
            cache.k = k if cache.k is None else torch.cat([cache.k, k], 2)
            cache.v = v if cache.v is None else torch.cat([cache.v, v], 2)
            n, total = x.shape[1], cache.k.shape[2]
            if n > 1:  # new token i sees the cached ones and new ones up to itself
                mask = torch.arange(total, device=x.device) <= (total - n + torch.arange(n, device=x.device))[:, None]
        q = heads_first(self.q_norm(q))
        if x.shape[1] == 1 and self.backend == "auto":
            # One query token: two small products. The fused kernels cost more per call than this whole product on
            # CPU (0.4 ms a call, measured: benchmarks/fourm_generate.py), and a token-by-token decoder makes two
            # calls per layer per token.
            scores = (q @ cache.k.transpose(-2, -1)) * self.head_dim ** -0.5
            if mask is not None:  # a key-padding mask [B, Lk]
                scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
            out = scores.softmax(-1) @ cache.v
        else:
            out = attention(q, cache.k, cache.v, mask=mask, backend=self.backend)
        return self.proj(out.transpose(1, 2).flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: [x += attn(norm(x))]; [x += cross_attn(norm(x), context)]; x += mlp(norm(x)).
    `self_attention=False` with `cross_attention=True` is MultiMAE's decoder entry: cross-attention and MLP only."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, mlp: str = "gelu", bias: bool = True,
                 qk_norm: bool = False, layer_scale: float | None = None, drop_path: float = 0.0,
                 cross_attention: bool = False, drop: float = 0.0, attn_drop: float = 0.0, backend: str = "auto",
                 self_attention: bool = True):
        super().__init__()
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu' (got {mlp!r})")
        if not (self_attention or cross_attention):
            raise ValueError("a block needs self-attention, cross-attention or both")
        hidden = int(dim * mlp_ratio)
        scale = (lambda: LayerScale(dim, layer_scale)) if layer_scale else nn.Identity  # noqa: E731
        path = (lambda: DropPath(drop_path)) if drop_path else nn.Identity  # noqa: E731
        if self_attention:
            self.norm1 = nn.LayerNorm(dim, eps=1e-6, bias=bias)
            self.attn = Attention(dim, heads, bias, qk_norm, attn_drop=attn_drop, proj_drop=drop, backend=backend)
            self.ls1, self.drop_path1 = scale(), path()
        if cross_attention:
            self.norm_cross, self.norm_context = nn.LayerNorm(dim, eps=1e-6, bias=bias), nn.LayerNorm(dim, eps=1e-6, bias=bias)
            self.cross_attn = Attention(dim, heads, bias, qk_norm, cross=True, attn_drop=attn_drop, proj_drop=drop,
                                        backend=backend)
            self.ls_cross, self.drop_path_cross = scale(), path()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, bias=bias)
        self.mlp = (Mlp if mlp == "gelu" else SwiGLU)(dim, hidden if mlp == "gelu" else int(hidden * 2 / 3), bias,
                                                       drop)
        self.ls2, self.drop_path2 = scale(), path()

    def forward(self, x: torch.Tensor, packing: Packing | None = None, *, context: torch.Tensor | None = None,
                context_packing: Packing | None = None, causal: Any = False, mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, rope: RotaryEmbedding2D | None = None,
                positions: torch.Tensor | None = None, cross_packing: Packing | None = None) -> torch.Tensor:
        """`cross_packing` splits packed queries for the cross-attention differently from `packing` (4M's decoder:
        self-attention within each sample's target modality, cross-attention per sample); default `packing`."""
        if hasattr(self, "attn"):
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), packing, causal=causal, mask=mask, rope=rope,
                                                       positions=positions)))
        if hasattr(self, "cross_attn"):
            if context is None:
                raise ValueError("this block has cross-attention: pass context (and context_packing when packed)")
            if (packing is None) != (context_packing is None):
                raise ValueError("packed queries need packed context (context_packing), and padded need padded")
            x = x + self.drop_path_cross(self.ls_cross(self.cross_attn(
                self.norm_cross(x), cross_packing or packing, context=self.norm_context(context),
                context_packing=context_packing, mask=context_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def step(self, x: torch.Tensor, caches: tuple[KVCache, KVCache], context: torch.Tensor | None = None,
             context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` for incremental decoding (padded, eval mode) with this block's (self, cross) caches."""
        own, cross = caches
        if hasattr(self, "attn"):
            x = x + self.ls1(self.attn.step(self.norm1(x), own))
        if hasattr(self, "cross_attn"):
            x = x + self.ls_cross(self.cross_attn.step(self.norm_cross(x), cross, self.norm_context(context)
                                                       if cross.k is None else None, context_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of `Block`s and a final norm. `cross_attention=True` makes a decoder (each block also attends to
    `context`). Drop-path rises linearly to `drop_path` over the depth, as in timm."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float = 0.0, final_norm: bool = True,
                 **block_kwargs):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path=rate, **block_kwargs) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6, bias=block_kwargs.get("bias", True)) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (non-reentrant torch checkpointing)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, packing: Packing | None = None, **kwargs) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, packing, use_reentrant=False, **kwargs)
            else:
                x = block(x, packing, **kwargs)
        return self.norm(x)

    def new_caches(self) -> list[tuple[KVCache, KVCache]]:
        return [(KVCache(), KVCache()) for _ in self.blocks]

    def step(self, x: torch.Tensor, caches: list[tuple[KVCache, KVCache]], context: torch.Tensor | None = None,
             context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The new tokens `x` [B, n, C] through every block, each block's keys and values kept in `caches`
        (`new_caches()` to start): autoregressive decoding without recomputing the prefix."""
        for block, cache in zip(self.blocks, caches):
            x = block.step(x, cache, context, context_mask)
        return self.norm(x)


# ------------------------------------------------------------------------------------------- position embeddings

def sincos_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sin-cos embeddings of any-shaped integer positions: [..., dim] (sin half, then cos half, as MAE/4M)."""
    if dim % 2:
        raise ValueError(f"sin-cos embeddings need an even width (got {dim})")
    freqs = base ** (-torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2))
    angles = positions.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1).float()


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embeddings: half the width for the row, half for the column (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4 (got {dim})")
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], -1)


@functools.lru_cache(maxsize=64)
def sincos_grid(height: int, width: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`sincos_2d` of a height x width grid, row-major, [height * width, dim] float32; cached per grid, width and
    device (models call it every step). Shared: add to it, never write into it."""
    with torch.inference_mode(False):  # a table first made under inference mode must still serve training
        rows, cols = grid_positions(height, width, device)
        return sincos_2d(rows, cols, dim)


def grid_positions(height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch of a height x width grid, row-major: two [height * width] tensors."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                indexing="ij")
    return rows.flatten(), cols.flatten()


class LearnedPositions(nn.Module):
    """Learned position embeddings looked up by each token's position (padded or packed alike)."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class RotaryEmbedding2D(nn.Module):
    """2-D rotary position embedding (RoPE) for q and k: the first half of each head's channels rotates with the
    token's row, the second half with its column. `positions` is [..., 2] (row, col) matching the token dims of
    q `[..., H, D]` (packed `[T, H, D]` or padded `[B, L, H, D]`)."""

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head size divisible by 4 (got {head_dim})")
        quarter = head_dim // 4
        self.register_buffer("freqs", base ** (-torch.arange(quarter, dtype=torch.float32) / quarter),
                             persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions is None or positions.shape[-1] != 2 or positions.shape[:-1] != x.shape[:-2]:
            raise ValueError(f"2-D RoPE needs (row, col) positions of shape {tuple(x.shape[:-2]) + (2,)}")
        angles = (positions.to(self.freqs.dtype)[..., None] * self.freqs).flatten(-2)  # [..., D/2]
        cos, sin = angles.cos()[..., None, :].to(x.dtype), angles.sin()[..., None, :].to(x.dtype)
        first, second = x.chunk(2, -1)  # rotate pairs (i, i + D/4) within each half
        return torch.cat([_rotate(first, cos[..., : first.shape[-1] // 2], sin[..., : first.shape[-1] // 2]),
                          _rotate(second, cos[..., first.shape[-1] // 2:], sin[..., first.shape[-1] // 2:])], -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def attention_flops(lengths_q, lengths_k, heads: int, head_dim: int) -> float:
    """Forward FLOPs of the attention products alone (QK^T and AV) for packed sequences."""
    return sum(4.0 * heads * head_dim * lq * lk for lq, lk in zip(lengths_q, lengths_k))


__all__ = ["Attention", "Block", "Embedding", "KVCache", "LearnedPositions", "Linear", "Mlp", "RotaryEmbedding2D", "SwiGLU", "Transformer",
           "attention_flops", "grid_positions", "sincos_1d", "sincos_2d", "sincos_grid"]
