"""Our attention inside open_clip's towers: `use_our_attention(model, backend)` replaces every
`nn.MultiheadAttention` of open_clip's ViT and text transformers with `MultiheadAttention` below, which keeps the
same parameters under the same names (`in_proj_weight`, `in_proj_bias`, `out_proj`), so checkpoints load and
export exactly as before, and runs `polymodal.models.attention.attention` with the chosen backend. open_clip's
additive causal text mask becomes `causal=True` (no L x L mask in memory).

`use_packed_patch_dropout(visual, prob)` then makes FLIP's patch dropout keep each patch with probability 1 - prob,
so samples keep different numbers of patches, and runs the kept tokens packed (no padding to a common count):
the dropout packs the batch into one row and records its Packing, the tower's attention layers read it, and the
transformer's output is unpacked (each sample's class token first) for open_clip's pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.models.attention import BACKENDS, Packing, attention


class MultiheadAttention(nn.Module):
    """A drop-in for `nn.MultiheadAttention` as open_clip calls it: (q, k, v, need_weights=False, attn_mask) ->
    (output, None)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, batch_first: bool, dropout: float,
                 backend: str = "auto"):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = embed_dim, num_heads, batch_first, dropout
        self.backend = backend
        self.packed: PackedTokens | None = None  # set by use_packed_patch_dropout for the image tower
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def replacing(cls, stock: nn.MultiheadAttention, backend: str) -> MultiheadAttention:
        ours = cls(stock.embed_dim, stock.num_heads, stock.in_proj_bias is not None, stock.batch_first,
                   stock.dropout, backend)
        ours.load_state_dict(stock.state_dict())
        return ours.to(stock.in_proj_weight.device, stock.in_proj_weight.dtype)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None, key_padding_mask=None):
        if need_weights:
            raise ValueError("our attention returns no attention weights (need_weights=False)")
        if not self.batch_first:  # [L, B, C] -> [B, L, C]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key is value:
            q, k, v = F.linear(query, w, b).chunk(3, -1)
        else:
            ws, bs = w.chunk(3), (b.chunk(3) if b is not None else (None,) * 3)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
        if self.packed is not None and self.packed.packing is not None:  # [1, T, C]: the batch, packed
            cu, longest = self.packed.packing.cu_seqlens.to(q.device), self.packed.packing.max_seqlen
            q, k, v = (x[0].unflatten(-1, (self.num_heads, -1)) for x in (q, k, v))
            out = attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=longest,
                            dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
            out = self.out_proj(out.flatten(1))[None]
            return (out if self.batch_first else out.transpose(0, 1)), None
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        mask, causal = _mask(attn_mask, key_padding_mask, q.shape[0], self.num_heads, q.shape[1], k.shape[1],
                             q.dtype)
        out = attention(heads(q), heads(k), heads(v), causal=causal, mask=mask,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _mask(attn_mask, key_padding_mask, batch: int, heads: int, lq: int, lk: int, dtype):
    """nn.MultiheadAttention's masks (bool: True masks out; float: added) as one additive mask for ours; open_clip's
    additive causal text mask alone becomes `causal=True` (no L x L mask at all)."""
    if attn_mask is not None and key_padding_mask is None and attn_mask.dtype != torch.bool and lq == lk and \
            attn_mask.shape == (lq, lk) and _is_causal(attn_mask):
        return None, True
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.view(batch, heads, lq, lk) if mask.dim() == 3 else mask[None, None]
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, dtype)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask, False


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _is_causal(mask: torch.Tensor) -> bool:
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def use_our_attention(model: nn.Module, backend: str = "auto") -> int:
    """Replace every nn.MultiheadAttention in `model` (with q, k, v of one width) by ours; returns how many."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
                setattr(parent, name, MultiheadAttention.replacing(child, backend))
                swapped += 1
    return swapped


class PackedTokens:
    """The Packing of the image tower's current batch (None: a normal padded batch), shared by its layers."""

    packing: Packing | None = None


class PackedPatchDropout(nn.Module):
    """FLIP patch dropout with a per-sample count: each patch is kept with probability 1 - prob (at least one per
    sample), the class token always; in training the kept tokens leave packed as one row [1, T, C]."""

    def __init__(self, prob: float, packed: PackedTokens):
        super().__init__()
        if not 0.0 < prob < 1.0:
            raise ValueError(f"patch dropout must be in (0, 1) (got {prob})")
        self.prob, self.packed = prob, packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.packed.packing = None
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], x.shape[1] - 1, device=x.device) >= self.prob
        keep[torch.arange(len(keep), device=x.device), torch.randint(0, keep.shape[1], (len(keep),),
                                                                     device=x.device)] = True  # >= 1 patch
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], 1)
        self.last_keep = keep  # which tokens each sample kept (for tests and pictures)
        self.packed.packing = Packing.from_lengths(keep.sum(1).cpu())
        return x[keep][None]


def _unpack(module, inputs, output: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
    """The visual transformer's forward hook: a packed [1, T, C] output back to [B, L, C], class token first."""
    if packed.packing is None:
        return output
    p = packed.packing
    out = output.new_zeros(len(p.lengths), p.max_seqlen, output.shape[-1])
    return out.index_put((p.sequence_ids().to(output.device), p.positions().to(output.device)), output[0])


def use_packed_patch_dropout(visual: nn.Module, prob: float) -> None:
    """Give an open_clip VisionTransformer whose attention is ours a per-sample, packed patch dropout."""
    if getattr(visual, "pool_type", None) != "tok" or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("per-sample patch dropout needs an open_clip ViT pooled by its class token (pool_type "
                         "'tok', no attentional pooler)")
    layers = [m for m in visual.modules() if isinstance(m, MultiheadAttention)]
    if not layers:
        raise ValueError("per-sample patch dropout needs our attention in the image tower (attention_backend)")
    packed = PackedTokens()
    for layer in layers:
        layer.packed = packed
    visual.patch_dropout = PackedPatchDropout(prob, packed)
    visual.transformer.register_forward_hook(lambda m, i, o: _unpack(m, i, o, packed))
