"""Text: a WordPiece vocabulary trained on the training captions (Hugging Face `tokenizers`), carrying 4M's extra
tokens, and the serialisation of sequence modalities that are not prose (palettes, metadata) through it.

Extra tokens, each one id that is never split:
- `[PAD]`, `[UNK]`, `[EOS]`; sentinels `[S_0]`..`[S_{k-1}]` for T5-style span masking;
- a start token per sequence modality, `[caption]`, `[palette]`, `[metadata]`...;
- bin tokens for numbers: `v0=0`..`v0={bins-1}` for values, `v1=0`..`v1={keys-1}` for counts and keys, as 4M
  writes them ("v1=3 v0=12 v0=200 v0=31 ..." is a palette of 3 colours).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from polymodal.data.errors import ConfigError
from polymodal.tokenizers.base import Tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]
DEFAULT_MODALITIES = ["caption", "palette", "metadata", "label"]


def extra_tokens(sentinels: int, modalities: Sequence[str], bins: int, keys: int) -> list[str]:
    return (SPECIALS + [f"[S_{i}]" for i in range(sentinels)] + [f"[{m}]" for m in modalities]
            + [f"v1={i}" for i in range(keys)] + [f"v0={i}" for i in range(bins)])


class TextTokenizer(Tokenizer):
    """A trained WordPiece vocabulary with 4M's extra tokens: str <-> ids."""

    name = "wordpiece"

    def __init__(self, hf_tokenizer, settings: dict):
        self.hf, self.settings = hf_tokenizer, dict(settings)
        self.pad_id, self.unk_id, self.eos_id = (self.hf.token_to_id(t) for t in SPECIALS)

    # -- the interface
    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.hf.encode(text).ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False).replace(" ##", "")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def grid(self, size: int) -> None:
        return None  # a sequence, not a grid

    def tokenizer_config(self) -> dict:
        return dict(self.settings)

    @property
    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.hf.get_vocab().items()))
        config = json.dumps(self.settings, sort_keys=True)
        return (f"{self.name}:{hashlib.sha256(config.encode()).hexdigest()[:8]}:"
                f"{hashlib.sha256(vocab.encode()).hexdigest()[:16]}")

    # -- tokens of the extras
    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.settings["sentinels"]:
            raise ValueError(f"sentinel {i} out of range (the vocabulary has {self.settings['sentinels']})")
        return self.hf.token_to_id(f"[S_{i}]")

    def modality_start(self, modality: str) -> int:
        token = self.hf.token_to_id(f"[{modality}]")
        if token is None:
            raise ValueError(f"no start token for modality {modality!r} (the vocabulary has "
                             f"{', '.join(self.settings['modalities'])})")
        return token

    def unknown_rate(self, texts: Iterable[str]) -> float:
        """The share of word pieces of `texts` that are [UNK]."""
        total = unknown = 0
        for encoding in self.hf.encode_batch(list(texts)):
            total += len(encoding.ids)
            unknown += sum(1 for i in encoding.ids if i == self.unk_id)
        return unknown / max(total, 1)

    # -- files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(self.hf.to_str())
        data["polymodal"] = self.settings
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no WordPiece vocabulary here (polymodal tokenizer train-text writes one)")
        data = json.loads(path.read_text(encoding="utf-8"))
        settings = data.pop("polymodal", None)
        if settings is None:
            raise ConfigError(f"{path} is a tokenizers file without polymodal's settings (train it with "
                              "`polymodal tokenizer train-text`)")
        return cls(HFTokenizer.from_str(json.dumps(data)), settings)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, sentinels: int = 100,
                    modalities: Sequence[str] = DEFAULT_MODALITIES, bins: int = 256, keys: int = 64,
                    min_frequency: int = 2) -> TextTokenizer:
    """A lower-cased WordPiece vocabulary (BERT's normalisation and pre-tokenisation) over `texts`, plus the
    extra tokens; `vocab_size` counts the extras too."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    extras = extra_tokens(sentinels, modalities, bins, keys)
    if vocab_size <= len(extras) + 100:
        raise ConfigError(f"vocab size {vocab_size} leaves no room for words beside {len(extras)} extra tokens")
    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=extras,
                                        show_progress=False)
    hf.train_from_iterator(texts, trainer)
    settings = {"vocab_size": vocab_size, "sentinels": sentinels, "modalities": list(modalities), "bins": bins,
                "keys": keys}
    return TextTokenizer(hf, settings)


# ---------------------------------------------------------------------------------- sequence modalities as text

def quantize(value: float, low: float, high: float, bins: int) -> int:
    """The bin of `value` in [low, high] split into `bins` equal bins (clamped)."""
    if high <= low:
        raise ValueError(f"empty range [{low}, {high}]")
    return min(bins - 1, max(0, int((value - low) / (high - low) * bins)))


def bin_centre(index: int, low: float, high: float, bins: int) -> float:
    return low + (index + 0.5) * (high - low) / bins


def serialize_palette(colours, bins: int = 256) -> str:
    """k RGB colours (0-255) as 4M writes them: "v1=k v0=R v0=G v0=B ..." (channels quantised to `bins`)."""
    colours = [tuple(int(c) for c in colour) for colour in colours]
    parts = [f"v1={len(colours)}"]
    for colour in colours:
        parts += [f"v0={quantize(c, 0, 256, bins)}" for c in colour]
    return " ".join(parts)


def parse_palette(text: str, bins: int = 256) -> list[tuple[int, int, int]]:
    tokens = text.split()
    if not tokens or not tokens[0].startswith("v1="):
        raise ValueError(f"not a palette: {text[:40]!r}")
    k = int(tokens[0][3:])
    values = [int(t[3:]) for t in tokens[1:1 + 3 * k]]
    if len(values) != 3 * k or not all(t.startswith("v0=") for t in tokens[1:1 + 3 * k]):
        raise ValueError(f"a palette of {k} colours needs {3 * k} values: {text[:60]!r}")
    to_channel = (lambda i: i) if bins == 256 else (lambda i: round(bin_centre(i, 0, 256, bins)))
    return [tuple(to_channel(v) for v in values[i:i + 3]) for i in range(0, 3 * k, 3)]


def serialize_metadata(values: dict[str, float], spec: dict[str, tuple[float, float]], bins: int = 256) -> str:
    """Metadata as "v1=<key index> v0=<bin>" pairs, keys in the order of `spec` (name -> value range)."""
    names = list(spec)
    parts = []
    for name, value in values.items():
        if name not in spec:
            raise ValueError(f"metadata key {name!r} has no range in the spec ({', '.join(names)})")
        parts += [f"v1={names.index(name)}", f"v0={quantize(value, *spec[name], bins)}"]
    return " ".join(parts)


def parse_metadata(text: str, spec: dict[str, tuple[float, float]], bins: int = 256) -> dict[str, float]:
    """The inverse of serialize_metadata: each value at its bin's centre."""
    names, tokens = list(spec), text.split()
    if len(tokens) % 2:
        raise ValueError(f"metadata comes in v1=/v0= pairs: {text[:60]!r}")
    out = {}
    for key, value in zip(tokens[::2], tokens[1::2]):
        name = names[int(key.removeprefix("v1="))]
        out[name] = bin_centre(int(value.removeprefix("v0=")), *spec[name], bins)
    return out


class OpenClipBPE(Tokenizer):
    """open_clip's byte-level BPE (CLIP's 49,408-token vocabulary) through the same interface: ids without the
    fixed-length padding open_clip's tokenizer adds, start and end tokens kept."""

    name = "open_clip_bpe"

    def __init__(self, model: str = "ViT-B-32"):
        import open_clip

        self.model = model
        self.bpe = open_clip.get_tokenizer(model)
        if not hasattr(self.bpe, "encode"):
            raise ConfigError(f"open_clip model {model!r} uses a Hugging Face tokenizer, not open_clip's BPE")

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.bpe.sot_token_id, *self.bpe.encode(text), self.bpe.eot_token_id], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.bpe.sot_token_id, self.bpe.eot_token_id, 0)]
        return self.bpe.decode(ids).strip()

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def grid(self, size: int) -> None:
        return None

    def tokenizer_config(self) -> dict:
        return {"model": self.model, "vocab_size": self.vocab_size}

    @property
    def fingerprint(self) -> str:
        ranks = json.dumps(sorted((" ".join(pair), rank) for pair, rank in self.bpe.bpe_ranks.items()))
        return f"{self.name}:{self.vocab_size}:{hashlib.sha256(ranks.encode()).hexdigest()[:16]}"
