"""Typed configs: dataclass schemas filled from YAML files and `key=value` overrides (OmegaConf).

An unknown key or a value of the wrong type is a `ConfigError` naming the key, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polymodal.data.errors import ConfigError

T = TypeVar("T")


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    return f"config key {key!r}: {message}" if key else f"config: {message}"


def _parse_override(override: str):
    try:
        return OmegaConf.from_dotlist([override])
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({' '.join(str(exc).split()[:8])}...); "
                          "inside a list, quote items holding braces or commas: "
                          "key='[\"a/{0..2}.tar\",\"b.tar\"]'") from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                section: str | None = None) -> T:
    """Build `schema` from the YAML at `path` (its `section` if given) and `key=value` overrides.

    Returns a plain dataclass instance (OmegaConf.to_object), so the rest of the code sees ordinary Python.
    """
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            loaded = OmegaConf.load(path)
            if section is not None:
                loaded = loaded.get(section, {})
            merged = OmegaConf.merge(merged, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            for override in overrides:
                merged = OmegaConf.merge(merged, _parse_override(override))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {exc.filename}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {' '.join(str(exc).split())}") from None


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def demo_data_folder() -> str:
    """The embedded demo data inside the installed package, for `${demo_data:}` in configs: shipped configs name
    it so, and run from any folder."""
    return str(Path(__file__).resolve().parent / "demo_data")


def _register_resolvers() -> None:
    import warnings

    if not OmegaConf.has_resolver("demo_data"):
        with warnings.catch_warnings():  # 2.4 renames it register_resolver; 2.3 has only this name
            warnings.simplefilter("ignore", UserWarning)
            OmegaConf.register_new_resolver("demo_data", demo_data_folder)


_register_resolvers()
