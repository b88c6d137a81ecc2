"""Objectives: registered by name; each builds its model from its config section and returns
`{"loss": tensor, **metrics}` for a batch. The engine knows nothing else about them.
"""

from __future__ import annotations

from typing import Any, Callable

from polymodal.data.errors import ConfigError
from polymodal.pretrain.objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> dict[str, type[Objective]]:
    _import_builtins()
    return dict(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    objectives = available()
    if name not in objectives:
        raise ConfigError(f"config key 'objective.name': {'unknown objective ' + repr(name) if name else 'missing'}; "
                          f"available: {', '.join(sorted(objectives))}")
    return objectives[name]


def build_objective(section: dict[str, Any]) -> Objective:
    """Build the objective named by `section['name']` from the rest of the section (checked against its schema)."""
    from polymodal.pretrain.config import objective_config

    return objective_class(section.get("name", ""))(objective_config(section))


def _import_builtins() -> None:
    # Imported lazily so that `polymodal data ...` does not pay for timm/open_clip imports.
    from polymodal.pretrain.objectives import classify, contrastive, spark  # noqa: F401
