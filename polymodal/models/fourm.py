"""4M (Mizrahi et al. 2023; 4M-21, Bachmann et al. 2024): one encoder-decoder transformer over the discrete tokens
of many modalities. Built from our transformer blocks (SwiGLU, no bias, optional QK-norm) and attention function.

- Every modality is token ids: image-like ones a grid (an image tokenizer's codes), sequences a list (WordPiece
  ids of captions, palettes, metadata). A token's embedding is its id's embedding (one table per modality), plus
  its position (2-D sin-cos on the grid, 1-D sin-cos along a sequence), plus a learned modality embedding that the
  encoder and decoder share.
- The encoder sees each sample's input tokens; `global_tokens` learned tokens join every sample, so that a sample
  with no input at all (generation with every condition dropped, for classifier-free guidance) still has context.
- The decoder's tokens are each sample's targets: for an image-like modality a shared mask token plus the target's
  position and modality embedding (predicted in parallel); for a sequence the target ids themselves, shifted (next
  token prediction, teacher-forced). Self-attention stays within one sample's one modality (4M's
  `decoder_sep_mask`), causal for sequences; cross-attention reaches all of the sample's encoder tokens.
- Packed (default): the encoder runs one variable-length sequence per sample, the decoder's self-attention one per
  (sample, target modality) with a causal flag each, and its cross-attention one per sample: nobody is padded to a
  fixed token count. Padded (`packed=False`, 4M's way): every sample padded to the longest, with dense boolean
  masks. The two give the same result (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.models.attention import Packing
from polymodal.models.token_selection import Visible
from polymodal.models.transformer import Embedding, Linear, Transformer, sincos_1d, sincos_grid


@dataclass(frozen=True)
class FourMModality:
    name: str
    vocab_size: int
    grid: tuple[int, int] | None = None  # image-like: the token grid (rows, cols); None: a sequence
    max_length: int = 0  # sequences: the most tokens an input or a target holds

    @property
    def is_sequence(self) -> bool:
        return self.grid is None


@dataclass
class Tokens:
    """One modality's candidate tokens for the encoder or the decoder, of which `keep` (bool [B, N]) are used.
    `ids` int64 [B, N] (None for image targets: mask tokens), `positions` int64 [B, N] (grid index, row-major, or
    place in the sequence)."""

    ids: torch.Tensor | None
    positions: torch.Tensor
    keep: torch.Tensor


class FourM(nn.Module):
    def __init__(self, modalities: list[FourMModality], dim: int, encoder_depth: int, decoder_depth: int,
                 heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, global_tokens: int = 1,
                 backend: str = "auto"):
        super().__init__()
        names = [m.name for m in modalities]
        if not modalities or len(set(names)) != len(names):
            raise ValueError(f"modalities must be named, once each: {names}")
        if dim % 4:
            raise ValueError(f"width {dim} must be divisible by 4 (2-D sin-cos positions)")
        self.modalities = {m.name: m for m in modalities}
        self.index = {name: i for i, name in enumerate(names)}
        self.dim, self.num_global = dim, global_tokens
        self.embed = nn.ModuleDict({m.name: Embedding(m.vocab_size, dim) for m in modalities})
        self.modality_embed = nn.Parameter(torch.empty(len(modalities), dim))
        self.mask_token = nn.Parameter(torch.empty(dim))
        self.global_tokens = nn.Parameter(torch.empty(global_tokens, dim))
        for p in (self.modality_embed, self.mask_token, self.global_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        block = {"mlp_ratio": mlp_ratio, "mlp": "swiglu", "bias": False, "qk_norm": qk_norm, "backend": backend}
        self.encoder = Transformer(dim, encoder_depth, heads, **block)
        self.decoder = Transformer(dim, decoder_depth, heads, cross_attention=True, **block)
        self.heads = nn.ModuleDict({m.name: Linear(dim, m.vocab_size, bias=False) for m in modalities})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------------------- embeddings

    def position_embedding(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        spec = self.modalities[name]
        if spec.is_sequence:
            return sincos_1d(positions, self.dim)
        return sincos_grid(*spec.grid, self.dim, positions.device)[positions]

    def embed_tokens(self, name: str, tokens: Tokens) -> torch.Tensor:
        """[B, N, dim]: token (or mask token) + position + modality embedding."""
        if tokens.ids is None:
            content = self.mask_token.expand(*tokens.positions.shape, -1)
        else:
            content = self.embed[name](tokens.ids)
        position = self.position_embedding(name, tokens.positions).to(content.dtype)
        return content + position + self.modality_embed[self.index[name]].to(content.dtype)

    # ---------------------------------------------------------------------------------------------------- forward

    def encode(self, inputs: dict[str, Tokens], packed: bool = True) -> tuple[torch.Tensor, Visible]:
        """The encoder's output at each sample's global tokens then its input tokens (packed [T, dim] or padded
        [B, L, dim], as the returned Visible says)."""
        batch = next(iter(inputs.values())).keep.shape[0] if inputs else None
        if batch is None:
            raise ValueError("the encoder needs at least one input modality")
        parts = [self.global_tokens.expand(batch, -1, -1)]
        keeps = [torch.ones(batch, self.num_global, dtype=torch.bool, device=self.global_tokens.device)]
        for name, tokens in inputs.items():
            parts.append(self.embed_tokens(name, tokens).to(parts[0].dtype))
            keeps.append(tokens.keep)
        visible = Visible(torch.cat(keeps, 1), packed)
        return self.encoder(visible.select(torch.cat(parts, 1)), **visible.attention_kwargs()), visible

    def decode(self, encoded: torch.Tensor, encoded_at: Visible, targets: dict[str, Tokens]) -> dict[str,
                                                                                                     torch.Tensor]:
        """Logits [T_m, vocab_m] per target modality: its kept target tokens, sample after sample, in order."""
        parts, keeps, owners = [], [], []
        for name, tokens in targets.items():
            parts.append(self.embed_tokens(name, tokens).to(encoded.dtype))
            keeps.append(tokens.keep)
            owners.append(torch.full(tokens.keep.shape, self.index[name], device=tokens.keep.device))
        keep = torch.cat(keeps, 1)
        at = Visible(keep, encoded_at.packed)
        owner = at.select(torch.cat(owners, 1)[..., None]).squeeze(-1)  # each decoder token's modality
        x = at.select(torch.cat(parts, 1))
        causal = torch.tensor([self.modalities[name].is_sequence for name in targets], device=keep.device)
        if at.packed:
            # One self-attention sequence per (sample, target modality); cross-attention per sample.
            lengths = torch.stack([k.sum(1) for k in keeps], 1).flatten()  # [B * M], sample-major
            nonempty = lengths > 0
            groups = Packing.from_lengths(lengths[nonempty])
            per_sequence = causal.repeat(len(keeps[0]))[nonempty]
            x = self.decoder(x, groups, cross_packing=at.packing, context=encoded,
                             context_packing=encoded_at.packing, causal=per_sequence)
            flat, flat_owner = x, owner
        else:
            by_index = torch.tensor([m.is_sequence for m in self.modalities.values()], device=keep.device)
            mask = _dense_decoder_mask(owner, at.pad_mask, by_index)
            x = self.decoder(x, mask=mask, context=encoded, context_mask=encoded_at.pad_mask)
            flat, flat_owner = x[at.pad_mask], owner[at.pad_mask]
        names = list(targets)
        return {name: self.heads[name](flat[flat_owner == self.index[name]]) for name in names}

    def forward(self, inputs: dict[str, Tokens], targets: dict[str, Tokens], packed: bool = True) -> dict[
            str, torch.Tensor]:
        encoded, at = self.encode(inputs, packed)
        return self.decode(encoded, at, targets)


def _dense_decoder_mask(owner: torch.Tensor, valid: torch.Tensor, causal_by_modality: torch.Tensor) -> torch.Tensor:
    """4M's decoder mask as a dense bool [B, 1, L, L] (True attends): a token sees the tokens of its own sample's
    modality (for sequences only the ones before it and itself); a padding token sees itself, so no row is
    empty. `owner` holds each token's modality index, `causal_by_modality` whether each modality is a sequence."""
    same = owner[:, :, None] == owner[:, None, :]
    length = owner.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=owner.device).tril()
    causal = causal_by_modality.to(owner.device)[owner][:, :, None]  # [B, L, 1]
    allowed = same & valid[:, None, :] & valid[:, :, None] & (~causal | earlier)
    allowed |= torch.eye(length, dtype=torch.bool, device=owner.device)
    return allowed[:, None]


__all__ = ["FourM", "FourMModality", "Tokens"]
