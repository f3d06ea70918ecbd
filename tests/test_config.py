"""Config composition and the checks that fail before any weights load."""

from pathlib import Path

import pytest

from ptlight.config import config_dir
from ptlight.errors import ConfigError
from ptlight.train import train_stage

CONF = Path(config_dir())


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_every_method_config_composes_with_a_registered_objective(compose_cfg, method):
    from ptlight.objectives import available_objectives

    cfg = compose_cfg(f"method={method}")
    assert cfg.method.objective.name in available_objectives()
    from ptlight.methods import METHODS

    assert cfg.method.module in METHODS


def test_default_is_the_sft_then_dpo_pipeline(compose_cfg):
    cfg = compose_cfg()
    assert cfg.method is None
    assert [s.method for s in cfg.pipeline] == ["sft", "dpo"]
    assert cfg.model.arch.model_type == "lfm2" and cfg.model.path is None
    assert compose_cfg("model=lfm2").model.path == "LiquidAI/LFM2-350M"


def test_command_line_overrides_reach_the_trainer_and_objective(compose_cfg):
    cfg = compose_cfg("method=dpo", "method.objective.beta=0.05", "trainer.max_steps=7",
                      "trainer.precision=bf16-mixed", "data.batch_size=4")
    assert cfg.method.objective.beta == 0.05 and cfg.trainer.max_steps == 7
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.batch_size == 4


@pytest.mark.parametrize("overrides,match", [
    (["method=dpo", "+method.objective.betta=1"], r"method\.objective\.betta.*valid keys: beta"),
    (["method=dpo", "method.objective.name=nope"], r"unknown objective 'nope'.*dpo"),
    (["method=dpo", "method.reference=none"], r"needs a reference model"),
    (["method=dpo", "method.module=sft"], r"consumes 'pairwise' data"),
    (["method=dpo", "data.on_bad_row=ignore"], r"data\.on_bad_row"),
])
def test_config_mistakes_fail_before_weights_load(compose_cfg, tmp_path, monkeypatch, overrides,
                                                  match):
    import ptlight.train as train

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(train, "build_policy", no_weights)
    with pytest.raises(ConfigError, match=match):
        train_stage(compose_cfg(*overrides), tmp_path)


def test_adapter_reference_without_lora_fails_before_weights_load(compose_cfg, tmp_path,
                                                                  monkeypatch):
    import ptlight.train as train

    monkeypatch.setattr(train, "build_policy", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("weights were loaded before the config was checked")))
    with pytest.raises(ConfigError, match=r"method\.reference=adapter needs LoRA"):
        train_stage(compose_cfg("method=dpo", "method.reference=adapter"), tmp_path)
