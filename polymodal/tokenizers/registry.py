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


def load_image_tokenizer(run: str):
    """(objective with its tokenizer_model, training image size or None) of a trained fsq/vqvae run: a run folder
    (its model.safetensors) or an exported file. The objective also knows how inputs are scaled (`inputs`)."""
    from polymodal.pretrain.export import exported_metadata, load_exported

    path = Path(run) / "model.safetensors" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ConfigError(f"{run}: no exported tokenizer weights (model.safetensors); train one with `polymodal "
                          "pretrain configs/tokenizer-fsq-cifar.yaml`, or run `polymodal checkpoint export`")
    objective = load_exported(path)
    if not hasattr(objective, "tokenizer_model"):
        raise ConfigError(f"{run} is a {objective.name!r} run, not an image tokenizer (fsq, vqvae)")
    return objective, int(exported_metadata(path).get("polymodal.image_size", 0)) or None


@register("image")
def _image(run: str) -> Tokenizer:
    """The ImageTokenizer of a trained fsq/vqvae run (inputs in [-1, 1])."""
    return load_image_tokenizer(run)[0].tokenizer_model
