"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import functools
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

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


def wandb_base_url() -> str:
    """The server wandb talks to: ``WANDB_BASE_URL``, else wandb's own default (it moves
    between releases: https://api.wandb.ai, https://api.forge.coreweave.com)."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    from wandb.sdk.wandb_settings import Settings

    return Settings().base_url


@functools.lru_cache(maxsize=None)
def _answers(host: str, port: int, timeout: float) -> bool:
    """One TCP connect (name lookup included) within ``timeout`` seconds."""
    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    ok: list[bool] = []
    probe = threading.Thread(target=connect, daemon=True)  # a name lookup ignores the timeout
    probe.start()
    probe.join(timeout)
    return bool(ok)


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the wandb server (:func:`wandb_base_url`, or the ``HTTPS_PROXY`` in front of it)
    answers a TCP connect within ``timeout`` seconds; the answer is kept for the process."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or wandb_base_url())
    return _answers(url.hostname or "", url.port or (443 if url.scheme == "https" else 80),
                    timeout)


_TOLD: set[str] = set()  # wandb hosts the user was told about (one line per host and process)


def wandb_offline() -> bool:
    """``logger=wandb`` logs offline (files under the run dir) without credentials, and with
    credentials when the server does not answer a quick connect: then one line says so, instead
    of wandb retrying for minutes and failing the run."""
    if not wandb_has_credentials() or os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
        return True
    if wandb_reachable():
        return False
    from lightning.pytorch.utilities import rank_zero_only

    host = wandb_base_url()
    if rank_zero_only.rank == 0 and host not in _TOLD:
        _TOLD.add(host)
        print(f"[ptlight] wandb: {host} does not answer (no network?); logging offline under "
              "<run dir>/wandb, upload later with `wandb sync <run dir>/wandb/offline-run-*`",
              file=sys.stderr)
    return True


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ptlight.wandb_offline"):
        OmegaConf.register_new_resolver("ptlight.wandb_offline", wandb_offline)
