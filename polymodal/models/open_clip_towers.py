"""CLIP-style two-tower models from open_clip configs: any name in `open_clip.list_models()` plus ours.

Our tiny configs (polymodal/models/open_clip_configs/*.json) are registered with open_clip itself, so a model
trained from them is loaded back by `open_clip.create_model_and_transforms(name, pretrained=path)` like any
other, once `register_configs()` has run (importing polymodal.models.open_clip_towers does it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip

from polymodal.data.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "open_clip_configs"


def register_configs() -> None:
    if not set(our_model_names()) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def our_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def create(name: str, pretrained: str | None = None, patch_dropout: float = 0.0, **model_kwargs):
    """An open_clip model, randomly initialised or from a local checkpoint file (never downloaded)."""
    register_configs()
    if name not in open_clip.list_models():
        raise ConfigError(f"config key 'objective.model': {name!r} is not an open_clip model config "
                          f"(open_clip.list_models() has {len(open_clip.list_models())}, e.g. ViT-B-32, "
                          f"{', '.join(our_model_names())})")
    if pretrained is not None and not Path(pretrained).is_file():
        raise ConfigError(f"config key 'objective.pretrained': {pretrained} is not a local file (weights are "
                          "never downloaded at run time)")
    root = logging.getLogger()
    level = root.level
    if pretrained is None:  # random init is what was asked for; open_clip would warn about it
        root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(name, pretrained=pretrained, force_patch_dropout=patch_dropout or None,
                                      require_pretrained=pretrained is not None, **model_kwargs)
    finally:
        root.setLevel(level)


def tokenizer(name: str):
    """open_clip's tokenizer for the model, as a str -> 1-D token tensor callable for the data workers."""
    register_configs()
    tok = open_clip.get_tokenizer(name)
    return lambda text: tok([text])[0]


register_configs()
