"""Public objective API: base classes, typed inputs and the entry-point registry
(group ``ptlight.objectives``, served by :mod:`ptlight.registry`)."""

from __future__ import annotations

from typing import Any

from ptlight.objectives.base import (
    DATA_KINDS,
    GroupRollout,
    Logps,
    Objective,
    ObjectiveOutput,
    Rewards,
    Rollout,
    TokenLogps,
)
from ptlight.objectives.tokens import TOKEN_TERMS, TokenTerms
from ptlight.registry import OBJECTIVES, PluginInfo
from ptlight.registry import plugin_info as _plugin_info

GROUP = OBJECTIVES.group


def available_objectives() -> dict[str, str]:
    """Objective name -> ``"module:attr"`` of its entry point (group ``ptlight.objectives``)."""
    return OBJECTIVES.available()


def get_objective(name: str) -> type[Objective]:
    """The objective class registered under ``name``. ``KeyError`` lists the installed names;
    :class:`~ptlight.errors.PluginError` names a plugin that fails to import or breaks the
    contract (not an :class:`Objective`, or an unknown ``data_kind``)."""
    return OBJECTIVES.load(name)


def build_objective(name: str, hparams: dict[str, Any]) -> Objective:
    """Objective ``name`` built from its hyperparameters, checked first: an unknown name or
    key is a :class:`~ptlight.errors.ConfigError` naming ``method.objective.<key>`` and the
    valid ones."""
    return OBJECTIVES.build(name, hparams, "method.objective")


def plugin_info(group: str = GROUP) -> list[PluginInfo]:
    """Every entry point of ``group`` (default: the objectives) with its distribution and
    version."""
    return _plugin_info(group)


__all__ = [
    "DATA_KINDS",
    "GROUP",
    "GroupRollout",
    "Logps",
    "Objective",
    "ObjectiveOutput",
    "PluginInfo",
    "Rewards",
    "Rollout",
    "TokenLogps",
    "TOKEN_TERMS",
    "TokenTerms",
    "available_objectives",
    "build_objective",
    "get_objective",
    "plugin_info",
]
