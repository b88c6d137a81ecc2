"""Modality tokenizers: turn a modality into discrete token ids and back, registered by name like objectives.

Tokenizers are registered by name (`registry.py`): `polymodal.tokenizers.load("wordpiece:runs/wp")`.
Every tokenizer has `encode(x) -> ids`, `decode(ids) -> x`, `vocab_size`, `grid` and `fingerprint` (its name,
config and a hash of its weights). Token data records the fingerprint, and reading tokens with a different
tokenizer is an error (`check_fingerprint`).

A subpackage of polymodal, never a top-level `tokenizers` (that would shadow Hugging Face's, which transformers
needs).
"""

from __future__ import annotations

from polymodal.tokenizers.base import FingerprintMismatch, Tokenizer, check_fingerprint, weights_hash
from polymodal.tokenizers.image import ImageTokenizer
from polymodal.tokenizers.registry import load, names, register

__all__ = ["FingerprintMismatch", "ImageTokenizer", "Tokenizer", "check_fingerprint", "load", "names", "register",
           "weights_hash"]
