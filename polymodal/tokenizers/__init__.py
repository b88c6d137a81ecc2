"""Modality tokenizers: turn a modality into discrete token ids and back, registered by name like objectives.

Every tokenizer has `encode(x) -> ids`, `decode(ids) -> x`, `vocab_size`, `grid` and `fingerprint` (its name,
config and a hash of its weights). Token data records the fingerprint, and reading tokens with a different
tokenizer is an error (`check_fingerprint`).

A subpackage of polymodal, never a top-level `tokenizers` (that would shadow Hugging Face's, which transformers
needs).
"""

from __future__ import annotations

from polymodal.tokenizers.base import FingerprintMismatch, Tokenizer, check_fingerprint, weights_hash
from polymodal.tokenizers.image import ImageTokenizer

__all__ = ["FingerprintMismatch", "ImageTokenizer", "Tokenizer", "check_fingerprint", "weights_hash"]
