"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> str:
    """``ptlight/conf`` in a wheel install, ``<repo>/conf`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"ptlight configs not found next to {here}; reinstall ptlight")


def resolve_device(name: str, key: str):
    """``auto`` (cuda when available) | ``cpu`` | ``cuda`` -> ``torch.device``; a ConfigError
    naming ``key`` otherwise. torch is imported here, not at module import (the apps parse the
    command line first)."""
    import torch

    from ptlight.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}; use auto, cpu or cuda")
    return torch.device(name)


def wandb_has_credentials() -> bool:
    """True when ``WANDB_API_KEY`` is set or ~/.netrc holds a wandb login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ptlight.wandb_offline"):
        OmegaConf.register_new_resolver("ptlight.wandb_offline", lambda: not wandb_has_credentials())
