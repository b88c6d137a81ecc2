"""What every tokenizer offers, and the fingerprint that ties token data to the tokenizer that made it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from polymodal.data.errors import ConfigError


class FingerprintMismatch(ConfigError):
    """Tokens made by one tokenizer read with another."""


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names, shapes, dtypes and values (bitwise)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # Flattened first: a weight with size-1 dims can be contiguous yet keep a channels-last stride.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


class Tokenizer:
    """The interface (a mixin for nn.Module tokenizers). Subclasses set `name` and implement the rest."""

    name: str = ""

    def encode(self, x: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def grid(self, size: int) -> tuple[int, int]:  # pragma: no cover - interface
        """The token grid (h, w) of a size x size input."""
        raise NotImplementedError

    def tokenizer_config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """name + config + weights hash: equal exactly when two tokenizers give the same tokens."""
        config = json.dumps(self.tokenizer_config(), sort_keys=True, default=str)
        state = self.state_dict() if hasattr(self, "state_dict") else {}
        return f"{self.name}:{hashlib.sha256(config.encode()).hexdigest()[:8]}:{weights_hash(state)}"


def check_fingerprint(recorded: str, tokenizer: Tokenizer, where: str = "the token data") -> None:
    if recorded != tokenizer.fingerprint:
        raise FingerprintMismatch(f"{where} was made by tokenizer {recorded}, but this is {tokenizer.fingerprint}: "
                                  "decode it with the tokenizer that made it, or tokenize again")
