"""Typed configs: dataclass schemas filled from YAML files and `key=value` overrides (OmegaConf).

An unknown key or a value of the wrong type is a `ConfigError` naming the key, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polymodal.data.errors import ConfigError

T = TypeVar("T")


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    return f"config key {key!r}: {message}" if key else f"config: {message}"


def _shape_error(schema, given, key: str, override_value: str | None = None) -> ConfigError | None:
    """What a list- or mapping-typed key expects and how to write it, when `given` holds something else there.

    OmegaConf's own message ('AnyNode is not a ListConfig') names its internals, not the fix. `override_value`
    is the text after '=' of a key=value override; None for a YAML file.
    """
    expected = OmegaConf.select(schema, key, default=None)
    got = OmegaConf.select(given, key, default=None)
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(expected, ListConfig) and not isinstance(got, ListConfig):
        if override_value is None:
            form = f"{leaf}: [...]"
        elif isinstance(got, DictConfig):
            form = f"{key}=[...]"
        else:
            form = f"{key}=[{override_value}]"
        return ConfigError(f"config key {key!r}: expects a list; write it as {form}")
    if isinstance(expected, DictConfig) and not isinstance(got, DictConfig):
        form = f"{leaf}: {{name: value}}" if override_value is None else f"{key}={{name: value}} or {key}.name=value"
        return ConfigError(f"config key {key!r}: expects a mapping; write it as {form}")
    return None


def _merge(merged, given, override: str | None = None):
    """`given` (a YAML file's values, or the parsed `override` key=value) merged over `merged`."""
    try:
        return OmegaConf.merge(merged, given)
    except (OmegaConfBaseException, TypeError) as exc:  # TypeError: a mapping given to a list key, or the reverse
        key, value = override.split("=", 1) if override else (getattr(exc, "full_key", None), None)
        error = _shape_error(merged, given, key.strip(), value) if key else None
        if error is not None:
            raise error from None
        if isinstance(exc, TypeError):
            raise ConfigError(f"config key {key.strip()!r}: {exc}" if key else f"config: {exc}") from None
        raise


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
            merged = _merge(merged, loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            for override in overrides:
                merged = _merge(merged, _parse_override(override), override)
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
