"""Shared fixtures: compose the real Hydra config with cheap values (tiny model, few steps)."""

from __future__ import annotations

import os
import tempfile

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ptlight.config import config_dir, register_resolvers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# precomputed reference log-probs are cached on disk (method.reference_cache): not in ~/.cache
os.environ.setdefault("PTLIGHT_CACHE", tempfile.mkdtemp(prefix="ptlight-test-cache-"))
register_resolvers()


@pytest.fixture
def compose_cfg():
    """``compose_cfg(*overrides)`` -> the composed root config (inside an initialised Hydra)."""
    GlobalHydra.instance().clear()
    ctx = initialize_config_dir(config_dir=config_dir(), version_base="1.3")
    ctx.__enter__()
    yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    ctx.__exit__(None, None, None)
    GlobalHydra.instance().clear()


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a training stage builds a model: checks that must come before the
    heavy work."""
    import ptlight.train

    monkeypatch.setattr(ptlight.train, "build_policy",
                        lambda *a, **k: pytest.fail("weights loaded"))
