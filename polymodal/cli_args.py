"""Argument types the subcommand parsers share: sizes, lists and templates given on the command line."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'500MB', '1GiB', '2000000' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500MB or 1GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def lines_or_list(value: str | None) -> list[str] | None:
    """A file with one item per line, or a comma-separated list."""
    if value is None:
        return None
    if os.path.isfile(value):
        return [line.strip() for line in Path(value).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [item.strip() for item in value.split(",") if item.strip()]


def templates(value: str | None) -> list[str] | None:
    """Caption templates: a file with one per line, or one template (templates may hold commas)."""
    if value is None or not os.path.isfile(value):
        return [value] if value else None
    return lines_or_list(value)
