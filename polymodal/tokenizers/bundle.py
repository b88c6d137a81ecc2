"""Tokenizers carried inside an exported model file, so a 4M export works without the folders it was trained with
(`polymodal checkpoint export RUN --format standalone`): `polymodal eval`, `embed` and `generate` read the one file.

An image tokenizer travels as its tensors (`tokenizers.<modality>.<name>`) and its objective config; a WordPiece
vocabulary as its tokenizer.json text; both in the safetensors metadata under `polymodal.tokenizer.<modality>`.
Loading writes them back as ordinary tokenizer folders in a temporary directory (removed at exit) and points the
config at them, so every code path that loads a tokenizer by path works unchanged. Specs that name no files
(`open_clip_bpe:...`) are kept as they are.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

from polymodal.data.errors import ConfigError

META_PREFIX = "polymodal.tokenizer."
TENSOR_PREFIX = "tokenizers."


IMAGE_TOKENIZERS = ("fsq", "vqvae")  # the objectives whose exports are image tokenizers


def bundle(tokenizer_specs: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) carrying each modality's tokenizer ({modality: spec as the config names it})."""
    # Plain safetensors and JSON reads, not the registry or the export module: those import this one's caller
    # (pretrain/export.py), and the files are checked here by what they hold.
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors, metadata = {}, {}
    for modality, spec in tokenizer_specs.items():
        path = Path(spec)
        weights = path / "model.safetensors" if path.is_dir() else path
        vocabulary = path / "tokenizer.json" if path.is_dir() else path
        if weights.suffix == ".safetensors" and weights.is_file():
            with safe_open(str(weights), "pt") as f:
                carried = f.metadata() or {}
            if json.loads(carried.get("polymodal.objective", "{}")).get("name") not in IMAGE_TOKENIZERS:
                raise ConfigError(f"tokenizer of {modality}: {weights} is not an exported image tokenizer "
                                  f"({', '.join(IMAGE_TOKENIZERS)})")
            tensors.update({f"{TENSOR_PREFIX}{modality}.{k}": v for k, v in load_file(str(weights)).items()})
            entry = {"kind": "image", "metadata": carried}
        elif vocabulary.suffix == ".json" and vocabulary.is_file():
            text = vocabulary.read_text(encoding="utf-8")
            if "polymodal" not in json.loads(text):
                raise ConfigError(f"tokenizer of {modality}: {vocabulary} is a tokenizers file without polymodal's "
                                  "settings (polymodal tokenizer train-text writes them)")
            entry = {"kind": "wordpiece", "tokenizer_json": text}
        elif ":" in spec and not path.exists():
            continue  # a tokenizer by name (open_clip_bpe:...): nothing to carry
        else:
            raise ConfigError(f"tokenizer of {modality}: {spec} is neither an image tokenizer run nor a WordPiece "
                              "vocabulary; the standalone export needs the files the run was trained with")
        metadata[META_PREFIX + modality] = json.dumps(entry)
    return tensors, metadata


def unbundle(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write the carried tokenizers to a temporary folder; {modality: path to load it from}. Removes their tensors
    from `tensors`."""
    from safetensors.torch import save_file

    entries = {k[len(META_PREFIX):]: json.loads(v) for k, v in metadata.items() if k.startswith(META_PREFIX)}
    if not entries:
        return {}
    root = Path(tempfile.mkdtemp(prefix="polymodal-tokenizers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    paths = {}
    for modality, entry in entries.items():
        folder = root / modality
        folder.mkdir()
        prefix = f"{TENSOR_PREFIX}{modality}."
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        if entry["kind"] == "image":
            save_file(own, str(folder / "model.safetensors"), metadata=entry["metadata"])
        else:
            (folder / "tokenizer.json").write_text(entry["tokenizer_json"], encoding="utf-8")
        paths[modality] = str(folder)
    return paths
