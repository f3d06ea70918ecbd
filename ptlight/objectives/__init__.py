"""Public objective API: base classes, typed inputs and the entry-point registry."""

from ptlight.objectives.base import (
    DATA_KINDS,
    Logps,
    Objective,
    ObjectiveOutput,
    Rewards,
    Rollout,
    TokenLogps,
)
from ptlight.objectives.registry import (
    available_objectives,
    build_objective,
    get_objective,
    plugin_info,
)

__all__ = [
    "DATA_KINDS",
    "Logps",
    "Objective",
    "ObjectiveOutput",
    "Rewards",
    "Rollout",
    "TokenLogps",
    "available_objectives",
    "build_objective",
    "get_objective",
    "plugin_info",
]
