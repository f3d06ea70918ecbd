"""Method LightningModules, resolved by the name in ``method.module``."""

from __future__ import annotations

import lightning as L

from ptlight.errors import ConfigError
from ptlight.methods.preference import PreferenceMethod
from ptlight.methods.sft import SFTMethod

METHODS: dict[str, type[L.LightningModule]] = {
    "sft": SFTMethod,
    "preference": PreferenceMethod,
}


def get_method(name: str) -> type[L.LightningModule]:
    if name not in METHODS:
        raise ConfigError(f"method.module={name!r} is unknown; available: "
                          f"{', '.join(sorted(METHODS))}")
    return METHODS[name]
