"""Method LightningModules, resolved by the name in ``method.module``."""

from __future__ import annotations

import lightning as L

from ptlight.errors import ConfigError
from ptlight.methods.group import GroupRLMethod
from ptlight.methods.preference import PreferenceMethod
from ptlight.methods.ppo import PPOMethod
from ptlight.methods.reward import RewardMethod
from ptlight.methods.sft import SFTMethod

METHODS: dict[str, type[L.LightningModule]] = {
    "sft": SFTMethod,
    "preference": PreferenceMethod,
    "rm": RewardMethod,
    "ppo": PPOMethod,
    "group": GroupRLMethod,
}


def get_method(name: str) -> type[L.LightningModule]:
    if name not in METHODS:
        raise ConfigError(f"method.module={name!r} is unknown; available: "
                          f"{', '.join(sorted(METHODS))}")
    return METHODS[name]
