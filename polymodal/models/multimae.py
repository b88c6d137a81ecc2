"""MultiMAE (Bachmann et al. 2022): one ViT over the patches of several image-like modalities, with a light
decoder per modality. Built from our transformer blocks and attention function.

- Input adapters: a patch embedding per image-like modality (rgb, grey, edges, depth, HOG...), or a learned class
  embedding then a patch embedding for segmentation-like maps. Every token gets fixed 2-D sin-cos positions (on
  whatever grid the input has) plus a learned modality embedding; `global_tokens` learned tokens join each sample.
- The encoder sees only the visible tokens (`visible`, bool [B, N] over all modalities' tokens side by side).
  Packed (default): each sample's visible tokens form one variable-length sequence (cumulative lengths, no
  padding). Padded: the visible tokens are gathered to the longest sample's count with a key-padding mask. The
  two give the same result.
- Output adapters (MultiMAE's spatial output adapter): the encoder tokens are projected to the decoder width;
  queries for every position of the target modality are mask tokens, or the modality's own visible encoder tokens
  where it had some, plus positions and the modality embedding; one cross-attention + MLP block over the visible
  tokens (with their positions and modality embeddings) and the global tokens, then `decoder_depth` self-attention
  blocks, then a linear un-patchify to [B, N_m, values per patch].

Where this differs from the reference code (EPFL-VILAB/MultiMAE), on purpose: the decoder's cross-attention adds
its output to the queries (a pre-norm residual, as every other block) where the reference replaces them; both
stacks end with a LayerNorm; encoder tokens get a learned modality embedding besides their positions (the
reference tells modalities apart by their adapters alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.models.attention import Packing
from polymodal.models.token_selection import Visible
from polymodal.models.transformer import Block, Linear, Transformer, sincos_grid


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    channels: int = 3  # image-like: input channels; classes: ignored
    classes: int = 0  # > 0: a class-index map [B, H, W] (segmentation-like)
    patch_size: int = 4  # this modality's pixels per token side
    input: bool = True  # gets an input adapter (the encoder may see it)
    target: bool = True  # gets an output adapter (a decoder reconstructs it)
    class_dim: int = 64  # width of the class embedding before the patch embedding (MultiMAE: 64)

    @property
    def values_per_patch(self) -> int:
        """What the decoder predicts per token: pixel values, or one logit per class per pixel."""
        return self.patch_size ** 2 * (self.classes or self.channels)


class PatchAdapter(nn.Module):
    """Image-like map [B, C, H, W] -> tokens [B, (H/p)(W/p), dim]; class maps [B, H, W] go through a learned class
    embedding first."""

    def __init__(self, spec: ModalitySpec, dim: int):
        super().__init__()
        self.spec = spec
        if spec.classes:
            self.class_embed = nn.Embedding(spec.classes, spec.class_dim)
            nn.init.trunc_normal_(self.class_embed.weight, std=0.02)
        self.proj = nn.Conv2d(spec.class_dim if spec.classes else spec.channels, dim, spec.patch_size,
                              spec.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.spec.classes:
            x = self.class_embed(x.long()).permute(0, 3, 1, 2).to(self.proj.weight.dtype)
        out = self.proj(x.to(self.proj.weight.dtype))
        return out.flatten(2).transpose(1, 2), tuple(out.shape[-2:])


class OutputAdapter(nn.Module):
    """MultiMAE's spatial output adapter for one target modality (see the module docstring)."""

    def __init__(self, spec: ModalitySpec, index: int, num_modalities: int, encoder_dim: int, dim: int, depth: int,
                 heads: int, own_tokens: bool, mlp_ratio: float, backend: str):
        super().__init__()
        self.spec, self.index, self.own_tokens = spec, index, own_tokens
        self.proj_context = Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.empty(dim))
        self.modality_embed = nn.Parameter(torch.empty(num_modalities, dim))
        for p in (self.mask_token, self.modality_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.cross = Block(dim, heads, mlp_ratio, self_attention=False, cross_attention=True, backend=backend)
        self.blocks = Transformer(dim, depth, heads, mlp_ratio=mlp_ratio, backend=backend)
        self.head = Linear(dim, spec.values_per_patch)

    def forward(self, encoded: torch.Tensor, visible: Visible, grid: tuple[int, int], segment: torch.Tensor,
                span: tuple[int, int], global_tokens: int) -> torch.Tensor:
        """`encoded`: the encoder's output at the visible tokens (packed or padded, as `visible`); every modality's
        tokens cover the same `grid`, and `segment` [N] gives each token's modality; `span` is this modality's
        [start, end) in N. Returns [B, N_m, values per patch]."""
        batch = visible.keep.shape[0]
        context = self.proj_context(encoded)
        dim = context.shape[-1]
        positions = sincos_grid(*grid, dim, context.device).repeat(len(segment) // (grid[0] * grid[1]), 1)
        embed = torch.cat([torch.zeros(global_tokens, dim, device=context.device),  # global tokens: no position
                           positions + self.modality_embed[segment].float()])
        embed = embed.to(context.dtype).expand(batch, -1, -1)
        fill = self.mask_token.to(context.dtype).expand(batch, visible.keep.shape[1], dim)
        full = visible.scatter(context, fill) if self.own_tokens else fill
        start, end = span[0] + global_tokens, span[1] + global_tokens
        queries = (full + embed)[:, start:end]  # [B, N_m, dim]
        context = context + visible.select(embed)
        if visible.packed:
            length = end - start
            uniform = Packing.from_lengths(torch.full((batch,), length, device=queries.device))
            queries = self.cross(queries.flatten(0, 1), uniform, context=context,
                                 context_packing=visible.packing).unflatten(0, (batch, length))
        else:
            queries = self.cross(queries, context=context, context_mask=visible.pad_mask)
        return self.head(self.blocks(queries))


class MultiMAE(nn.Module):
    def __init__(self, modalities: list[ModalitySpec], dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, drop_path: float = 0.0, global_tokens: int = 1,
                 decoder_dim: int = 256, decoder_depth: int = 2, decoder_heads: int = 8,
                 decoder_own_tokens: bool = True, attention_backend: str = "auto"):
        super().__init__()
        if not modalities:
            raise ValueError("MultiMAE needs at least one modality")
        self.specs = list(modalities)
        self.names = [s.name for s in self.specs]
        self.inputs = [s.name for s in self.specs if s.input]
        self.targets = [s.name for s in self.specs if s.target]
        self.dim, self.global_count = dim, global_tokens
        self.adapters = nn.ModuleDict({s.name: PatchAdapter(s, dim) for s in self.specs if s.input})
        self.modality_embed = nn.Parameter(torch.empty(len(self.inputs), dim))
        self.global_tokens = nn.Parameter(torch.empty(global_tokens, dim))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        self.encoder = Transformer(dim, depth, heads, drop_path=drop_path, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                                   backend=attention_backend)
        self.decoders = nn.ModuleDict({
            s.name: OutputAdapter(s, self.inputs.index(s.name) if s.name in self.inputs else 0, len(self.inputs),
                                  dim, decoder_dim, decoder_depth, decoder_heads,
                                  decoder_own_tokens and s.name in self.inputs, mlp_ratio, attention_backend)
            for s in self.specs if s.target})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        for decoder in self.decoders.values():
            decoder.blocks.set_grad_checkpointing(enable)

    def forward(self, inputs: dict[str, torch.Tensor], visible: torch.Tensor | None = None,
                targets: tuple[str, ...] = (), packed: bool = True) -> dict:
        """Encode the visible tokens of `inputs` (every input modality, in `self.inputs` order; a batch lacking a
        modality passes zeros and no visible token of it) and decode `targets`.

        `visible` bool [B, N] over the input modalities' tokens side by side (None: all visible). Returns
        `{"encoded": [T or B, (L), dim], "visible": Visible, "grid": (h, w), "spans": {name: (start, end)},
        "predictions": {target: [B, N_m, values per patch]}}`."""
        tokens, spans, grid, start = [], {}, None, 0
        for name in self.inputs:
            t, g = self.adapters[name](inputs[name])
            if grid is not None and g != grid:
                raise ValueError(f"modality {name!r} makes a {g[0]}x{g[1]} token grid, but "
                                 f"{self.inputs[0]!r} makes {grid[0]}x{grid[1]}: give the modalities patch sizes "
                                 "that tile their inputs into one grid")
            grid = g
            spans[name] = (start, start + t.shape[1])
            start += t.shape[1]
            tokens.append(t)
        device = self.global_tokens.device
        segment = torch.arange(len(self.inputs), device=device).repeat_interleave(grid[0] * grid[1])
        positions = sincos_grid(*grid, self.dim, device).repeat(len(self.inputs), 1)  # [N, dim]
        x = torch.cat(tokens, 1)
        x = x + (positions + self.modality_embed[segment].float()).to(x.dtype)
        batch = x.shape[0]
        x = torch.cat([self.global_tokens.to(x.dtype).expand(batch, -1, -1), x], 1)
        if visible is None:
            visible = torch.ones(batch, x.shape[1] - self.global_count, dtype=torch.bool, device=x.device)
        if visible.shape != (batch, x.shape[1] - self.global_count):
            raise ValueError(f"visible must be [batch, tokens] = [{batch}, {x.shape[1] - self.global_count}], got "
                             f"{tuple(visible.shape)}")
        keep = Visible(torch.cat([torch.ones(batch, self.global_count, dtype=torch.bool, device=x.device), visible],
                                 1), packed)
        encoded = self.encoder(keep.select(x), **keep.attention_kwargs())
        predictions = {name: self.decoders[name](encoded, keep, grid, segment, spans[name], self.global_count)
                       for name in targets}
        return {"encoded": encoded, "visible": keep, "grid": grid, "spans": spans, "predictions": predictions}


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C * patch * patch]: a map as its tokens' patches, row-major as the adapters' patch
    embedding orders them (F.unfold's order within a patch). Targets and predictions are compared in this form."""
    return F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)


def unpatchify(patches: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: [B, N, C * patch * patch] -> [B, C, *size]."""
    return F.fold(patches.transpose(1, 2), size, kernel_size=patch, stride=patch)


def timm_vit_export(model: MultiMAE, modality: str, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The encoder's path for `modality` as a timm `VisionTransformer` state dict on a `grid` of patches: the class
    token is the first global token; `pos_embed` holds our sin-cos positions plus the modality embedding (zero at
    the class token). `timm.create_model('vit_*', img_size=grid * patch, patch_size=..., embed_dim=..., depth=...,
    num_heads=...)` loads it with only the classifier head missing."""
    if modality not in model.inputs:
        raise ValueError(f"{modality!r} is not an input modality of this model (inputs: {', '.join(model.inputs)})")
    adapter = model.adapters[modality]
    if adapter.spec.classes:
        raise ValueError(f"{modality!r} is a class map; timm's ViT takes images")
    out = {"cls_token": model.global_tokens[:1][None].detach(),
           "patch_embed.proj.weight": adapter.proj.weight.detach(), "patch_embed.proj.bias": adapter.proj.bias.detach()}
    pos = sincos_grid(*grid, model.dim) + model.modality_embed[model.inputs.index(modality)].detach().float()
    out["pos_embed"] = torch.cat([torch.zeros(1, model.dim), pos])[None]
    for name, tensor in model.encoder.state_dict().items():
        out[name] = tensor  # blocks.N.* and norm.* have timm's names already
    return out
