"""Objectives: registered by name; each builds its model from its config section and returns
`{"loss": tensor, **metrics}` for a batch. The engine knows nothing else about them.
"""

from __future__ import annotations

from functools import cache
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


@cache
def _import_builtins() -> None:
    """Import every module of this package, so each built-in objective registers itself (adding one is adding a
    file), then the objectives other packages declare under the `polymodal.objectives` entry point group.
    Imported lazily so that `polymodal data ...` does not pay for timm/open_clip imports."""
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry in entry_points(group="polymodal.objectives"):
        entry.load()
