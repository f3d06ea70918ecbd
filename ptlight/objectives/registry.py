"""Objective discovery through the ``ptlight.objectives`` entry-point group.

Built-in objectives are registered in ptlight's own ``pyproject.toml`` exactly like third-party
plugins, so there is one code path. Every loaded plugin is checked against the contract
(subclass of :class:`Objective`, a known ``data_kind``) and its provenance (distribution and
version) is kept for ``python -m ptlight.objectives``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ptlight.errors import ConfigError, PluginError
from ptlight.objectives.base import DATA_KINDS, Objective

GROUP = "ptlight.objectives"


@dataclass(frozen=True)
class PluginInfo:
    """Where an entry point comes from."""

    name: str
    value: str
    distribution: str
    version: str


def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def plugin_info(group: str = GROUP) -> list[PluginInfo]:
    """Every entry point of ``group`` with its distribution name and version."""
    out = []
    for name, ep in sorted(_entry_points(group).items()):
        dist = getattr(ep, "dist", None)
        out.append(
            PluginInfo(
                name=name,
                value=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
            )
        )
    return out


def available_objectives() -> dict[str, str]:
    """Objective name -> ``"module:attr"`` of its entry point (group ``ptlight.objectives``)."""
    return {name: ep.value for name, ep in sorted(_entry_points(GROUP).items())}


def get_objective(name: str) -> type[Objective]:
    """Load the objective class registered under ``name``.

    Raises ``KeyError`` listing the installed names when ``name`` is unknown, and
    :class:`PluginError` naming the entry point when the plugin fails to import or breaks the
    contract.
    """
    eps = _entry_points(GROUP)
    if name not in eps:
        raise KeyError(
            f"unknown objective {name!r}; installed objectives: {', '.join(sorted(eps)) or 'none'} "
            f"(entry-point group {GROUP!r})"
        )
    ep = eps[name]
    try:
        cls = ep.load()
    except Exception as exc:  # a broken third-party plugin must not look like our bug
        raise PluginError(
            f"objective plugin {name!r} (entry point {ep.value!r}) failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not (inspect.isclass(cls) and issubclass(cls, Objective)):
        raise PluginError(
            f"objective plugin {name!r} (entry point {ep.value!r}) is not a subclass of "
            "ptlight.objectives.Objective"
        )
    if getattr(cls, "data_kind", "") not in DATA_KINDS:
        raise PluginError(
            f"objective plugin {name!r} (entry point {ep.value!r}) has data_kind "
            f"{getattr(cls, 'data_kind', None)!r}; expected one of {DATA_KINDS}"
        )
    return cls


def build_objective(name: str, hparams: dict[str, Any]) -> Objective:
    """Instantiate objective ``name`` with keyword hyperparameters, checking them first.

    Unknown keys raise :class:`ConfigError` naming ``method.objective.<key>`` and the valid keys.
    """
    cls = get_objective(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ConfigError(
            f"objective {name!r} has no hyperparameter(s) "
            f"{', '.join('method.objective.' + k for k in unknown)}; valid keys: "
            f"{', '.join(valid) or 'none'}"
        )
    return cls(**hparams)
