"""Tokenizers by name, as objectives are: `load("wordpiece:runs/wp")`, `load("open_clip_bpe:ViT-B-32")`,
`load("image:runs/tok-fsq")`. A spec without a known name is a path: a WordPiece vocabulary (tokenizer.json or
its folder) or a trained image tokenizer (a run folder with model.safetensors, or the file). A new kind is one
`@register("name")` on a function from the rest of the spec to a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from polymodal.data.errors import ConfigError
from polymodal.tokenizers.base import Tokenizer

_LOADERS: dict[str, Callable[[str], Tokenizer]] = {}


def register(name: str):
    def add(loader: Callable[[str], Tokenizer]) -> Callable[[str], Tokenizer]:
        if name in _LOADERS:
            raise ValueError(f"tokenizer {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return add


def names() -> list[str]:
    return sorted(_LOADERS)


def load(spec: str) -> Tokenizer:
    name, sep, rest = spec.partition(":")
    if sep and name in _LOADERS:
        return _LOADERS[name](rest)
    path = Path(spec)
    if (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        return _LOADERS["image"](spec)
    if (path / "tokenizer.json").is_file() or path.suffix == ".json":
        return _LOADERS["wordpiece"](spec)
    raise ConfigError(f"tokenizer {spec!r}: not a known kind ({', '.join(f'{n}:...' for n in names())}) nor a "
                      "WordPiece vocabulary (tokenizer.json) or image tokenizer run (model.safetensors)")


@register("wordpiece")
def _wordpiece(path: str) -> Tokenizer:
    from polymodal.tokenizers.text import TextTokenizer

    return TextTokenizer.load(path)


@register("open_clip_bpe")
def _open_clip_bpe(model: str) -> Tokenizer:
    from polymodal.tokenizers.text import OpenClipBPE

    return OpenClipBPE(model or "ViT-B-32")


@register("image")
def _image(run: str) -> Tokenizer:
    """The ImageTokenizer of a trained fsq/vqvae run (inputs in [-1, 1])."""
    from polymodal.data.tokenize_shards import load_image_tokenizer

    return load_image_tokenizer(run)[0].tokenizer_model
