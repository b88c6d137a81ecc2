"""A ViT built from our transformer blocks: patch embedding, a class token, fixed 2-D sin-cos positions, and the
`forward_features` / `forward_head` interface of timm models (so `classify` and `polymodal eval` take it as they
take a timm model). `keep` drops patches per sample (FLIP-style, a different count per sample), and the kept
tokens run packed: no sample is padded to the longest one.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.models.attention import Packing
from polymodal.models.transformer import Linear, Transformer, grid_positions, sincos_2d


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 mlp: str = "gelu", qk_norm: bool = False, layer_scale: float | None = None,
                 drop_path_rate: float = 0.0, attention_backend: str = "auto"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        nn.init.trunc_normal_(self.patch_embed.weight, std=0.02), nn.init.zeros_(self.patch_embed.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        rows, cols = grid_positions(self.grid, self.grid)
        self.register_buffer("pos_embed", sincos_2d(rows, cols, embed_dim), persistent=False)
        self.blocks = Transformer(embed_dim, depth, num_heads, drop_path=drop_path_rate, mlp_ratio=mlp_ratio,
                                  mlp=mlp, qk_norm=qk_norm, layer_scale=layer_scale, backend=attention_backend)
        self.num_features = embed_dim
        self.head = Linear(embed_dim, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.set_grad_checkpointing(enable)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C] patch tokens with their positions added."""
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed.to(images.dtype)

    def forward_features(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token features; with `keep` (a bool [B, N] patch mask, any count per sample) the class token and the
        kept patches of each sample run as one packed batch, returned packed ([T, C]) with their Packing."""
        tokens = self.patch_tokens(images)
        cls = self.cls_token.to(tokens.dtype).expand(len(tokens), 1, -1)
        if keep is None:
            return self.blocks(torch.cat([cls, tokens], 1))
        with_cls = torch.cat([torch.ones_like(keep[:, :1]), keep], 1)
        packing = Packing.from_lengths(with_cls.sum(1))
        packed = torch.cat([cls, tokens], 1)[with_cls]
        return self.blocks(packed, packing), packing

    def forward_head(self, features, pre_logits: bool = False) -> torch.Tensor:
        if isinstance(features, tuple):  # packed: each sample's first token is its class token
            features, packing = features
            pooled = features[packing.cu_seqlens[:-1].long()]
        else:
            pooled = features[:, 0]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images, keep))


def timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our ViT's weights under timm's `VisionTransformer` names (class token, learned `pos_embed` set to our fixed
    sin-cos values with a zero for the class token), for `timm.create_model('vit_*', ...).load_state_dict`."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks.blocks."):
            out[name.removeprefix("blocks.")] = tensor
        elif name.startswith("blocks.norm."):
            out[name.removeprefix("blocks.")] = tensor
        elif name.startswith("patch_embed."):
            out["patch_embed.proj." + name.removeprefix("patch_embed.")] = tensor
        elif name == "cls_token":
            out[name] = tensor[None]
        else:
            out[name] = tensor
    out["pos_embed"] = torch.cat([torch.zeros_like(model.pos_embed[:1]), model.pos_embed])[None]
    return out
