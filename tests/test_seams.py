"""The seams a contributor builds on: the one plugin registry, the Method base, the Reference
kinds, choosing an objective by name, the callbacks group and the trainer presets."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from helpers import TINY, tiny_model_cfg
from ptlight import registry
from ptlight.errors import ConfigError, PluginError
from ptlight.methods import METHODS
from ptlight.methods.base import Method
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.model.reference import (AdapterReference, FrozenCopy, NoReference, PolicyAtStart,
                                     Precomputed, build_reference)
from ptlight.objectives import Objective, ObjectiveOutput, build_objective

PACKAGE = Path(__file__).resolve().parent.parent / "ptlight"


class PositionalBeta(Objective):
    """Hyperparameters taken positionally-or-by-keyword, as a newcomer writes them."""

    name, data_kind, needs_reference = "posbeta", "pairwise", True

    def __init__(self, beta=0.1, scale: float = 1.0):
        super().__init__()
        self.beta, self.scale = beta, scale

    def forward(self, inputs):
        loss = torch.zeros(())
        return ObjectiveOutput(loss=loss, losses=loss[None])


class NeedsAlpha(Objective):
    name, data_kind = "needsalpha", "pairwise"

    def __init__(self, *, alpha: float):
        super().__init__()
        self.alpha = alpha


class TaskWithoutGold:
    @staticmethod
    def make_rows(kind, n, seed, split):
        return []


@pytest.fixture
def extra_plugins(monkeypatch):
    real = registry.entry_points
    extra = {
        registry.OBJECTIVES.group: [EntryPoint("posbeta", f"{__name__}:PositionalBeta", "x"),
                                    EntryPoint("needsalpha", f"{__name__}:NeedsAlpha", "x")],
        registry.TASKS.group: [EntryPoint("nogold", f"{__name__}:TaskWithoutGold", "x")],
    }
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: list(real(group=group)) + extra.get(group, []))


# ---- one registry ---------------------------------------------------------------------------
def test_hyperparameters_bind_whether_keyword_only_or_not(extra_plugins):
    obj = build_objective("posbeta", {"beta": 0.3})
    assert obj.beta == 0.3 and obj.scale == 1.0
    with pytest.raises(ConfigError, match=r"method\.objective\.betta; valid keys: beta, scale"):
        build_objective("posbeta", {"betta": 0.3})


def test_a_required_hyperparameter_left_out_is_named(extra_plugins):
    with pytest.raises(ConfigError, match=r"needs method\.objective\.alpha \(no default\)"):
        build_objective("needsalpha", {})
    assert build_objective("needsalpha", {"alpha": 2.0}).alpha == 2.0


def test_objectives_rewards_and_tasks_share_one_registry(extra_plugins):
    from ptlight.rewards import get_reward
    from ptlight.tasks import available_tasks, get_task
    from ptlight.tasks import sort as sort_task

    assert get_task("sort") is sort_task
    assert {"sort", "safety"} <= set(available_tasks())
    assert get_reward("gold").name == "gold"
    with pytest.raises(KeyError, match=r"unknown task 'nope'; installed tasks: .*safety.*sort"):
        get_task("nope")
    with pytest.raises(PluginError, match=r"task plugin 'nogold'.*has no gold_reward"):
        get_task("nogold")
    with pytest.raises(ConfigError, match=r"reward\.name: unknown reward 'nope'; installed"):
        registry.REWARDS.build("nope", {}, "reward")


def test_task_listing_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    from ptlight.tasks.__main__ import main

    main()
    out = capsys.readouterr().out
    assert "ptlight.tasks.sort" in out and "ptlight.tasks.safety" in out


# ---- choosing an objective by name ----------------------------------------------------------
def test_objective_by_name_drops_the_method_configs_defaults_it_does_not_take(
        compose_cfg, caplog):
    from ptlight.train import build_stage_objective

    overrides = ["method=dpo", "method.objective.name=ipo"]
    cfg = compose_cfg(*overrides)
    with caplog.at_level("INFO", logger="ptlight.train"):
        ipo = build_stage_objective(cfg, overrides)
    assert ipo.name == "ipo" and ipo.beta == 0.1  # dpo's beta: ipo takes it
    assert "takes no label_smoothing, rpo_alpha" in caplog.text
    # a key the user wrote is checked, with the valid ones named
    written = [*overrides, "method.objective.label_smoothing=0.2"]
    with pytest.raises(ConfigError, match=r"no hyperparameter\(s\) method\.objective\."
                                          r"label_smoothing; valid keys: beta, length_normalize"):
        build_stage_objective(compose_cfg(*written), written)
    # without the overrides (a config composed elsewhere) every key is checked
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_stage_objective(cfg, None)


def test_objective_by_name_on_the_command_line_reaches_the_stage(compose_cfg, tmp_path,
                                                                  monkeypatch):
    import ptlight.train as train
    from ptlight.pipeline import run

    built = []

    def stop(*a, **k):
        raise RuntimeError("stop before weights")

    real = train.build_stage_objective
    monkeypatch.setattr(train, "build_stage_objective",
                        lambda cfg, ov=None: built.append(real(cfg, ov)) or built[-1])
    monkeypatch.setattr(train, "build_policy", stop)
    overrides = [*TINY, "method=dpo", "method.objective.name=simpo"]
    with pytest.raises(RuntimeError, match="stop before weights"):
        run(compose_cfg(*overrides), tmp_path, overrides)
    assert built[0].name == "simpo"


def test_lora_settings_while_lora_is_off_are_an_error_before_weights(compose_cfg, tmp_path,
                                                                    monkeypatch):
    import ptlight.train as train
    from ptlight.train import train_stage

    monkeypatch.setattr(train, "build_policy", lambda *a: pytest.fail("weights loaded"))
    overrides = [*TINY, "method=sft", "model.lora.r=8"]
    with pytest.raises(ConfigError, match=r"model\.lora\.r set while LoRA is off.*"
                                          r"model\.lora\.enabled=true"):
        train_stage(compose_cfg(*overrides), tmp_path, overrides)


# ---- the Method base and the Reference kinds --------------------------------------------------
def test_every_method_is_a_method_and_train_stage_probes_nothing():
    assert all(issubclass(cls, Method) for cls in METHODS.values())
    tree = ast.parse((PACKAGE / "train.py").read_text())
    probes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", "") in ("hasattr", "getattr")]
    assert probes == [], f"train.py probes a method's attributes at lines {probes}"


def test_method_hooks_default_to_nothing(compose_cfg):
    from ptlight.methods.sft import SFTMethod

    cfg = compose_cfg("method=sft")
    objective = build_objective("sft", {})
    assert SFTMethod.data_kind_for(cfg.method, objective) == "sft"
    assert SFTMethod.extra_args(cfg, None) == {} and SFTMethod.trainer_overrides(cfg) == {}
    with pytest.raises(ConfigError, match="method.reference=copy cannot serve"):
        SFTMethod.check_reference("copy", objective)


@pytest.fixture(scope="module")
def tiny_policy():
    cfg = tiny_model_cfg()
    return build_policy(cfg, load_tokenizer(cfg))


def test_reference_kinds(tiny_policy):
    none = build_reference("none", tiny_policy, keep_copy=False)
    assert isinstance(none, NoReference) and not none.exists
    with pytest.raises(RuntimeError, match="no reference model"):
        none.scope()

    copy = build_reference("copy", tiny_policy, keep_copy=False)
    assert isinstance(copy, FrozenCopy) and copy.model is not tiny_policy
    assert not any(p.requires_grad for p in copy.model.parameters()) and not copy.model.training
    with copy.scope() as model:
        assert model is copy.model

    fresh = build_reference("precompute", tiny_policy, keep_copy=False)
    assert isinstance(fresh, Precomputed) and isinstance(fresh.scorer, PolicyAtStart)
    assert fresh.separate_model() is None  # no copy of the weights: the policy scores
    resumed = build_reference("precompute", tiny_policy, keep_copy=True)
    assert isinstance(resumed.scorer, FrozenCopy)
    fresh.values = {"val": torch.arange(6.0).view(3, 2)}  # [N, K]
    assert fresh.lookup("val", torch.tensor([2, 0])).tolist() == [4.0, 0.0, 5.0, 1.0]
    weights = resumed.scorer.model
    resumed.release()
    assert resumed.scorer is None and all(p.numel() == 0 for p in weights.parameters())
    with pytest.raises(ValueError, match="needs a policy built with model.lora.enabled"):
        AdapterReference(tiny_policy)


def test_the_frozen_copy_is_not_in_the_method_state(tiny_policy, compose_cfg):
    from ptlight.methods.preference import PreferenceMethod

    cfg = compose_cfg("method=dpo")
    method = PreferenceMethod(tiny_policy, build_objective("dpo", {}), cfg.method.optim,
                              reference=FrozenCopy(tiny_policy))
    assert all(k.startswith(("policy.", "objective.")) for k in method.state_dict())


# ---- conf: callbacks and trainer presets -----------------------------------------------------
def test_callbacks_come_from_config(compose_cfg):
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    from ptlight.train import build_callbacks

    assert build_callbacks(compose_cfg()) == []
    both = build_callbacks(compose_cfg("callbacks=[lr_monitor,early_stopping]"))
    assert {type(c) for c in both} == {LearningRateMonitor, EarlyStopping}
    own = compose_cfg("+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer}")
    assert type(build_callbacks(own)[0]).__name__ == "Timer"
    bad = compose_cfg("+callbacks.bad={_target_: collections.OrderedDict}")
    with pytest.raises(ConfigError, match=r"callbacks\.bad: OrderedDict is not a lightning"):
        build_callbacks(bad)


def test_trainer_presets(compose_cfg):
    from ptlight.runtime.devices import resolve_trainer

    cpu = compose_cfg("trainer=cpu").trainer
    assert resolve_trainer(cpu)["accelerator"] == "cpu"
    assert resolve_trainer(cpu)["precision"] == "32-true"
    assert compose_cfg("trainer=gpu").trainer.accelerator == "gpu"
    assert compose_cfg("trainer=ddp").trainer.strategy == "ddp"
    assert compose_cfg("trainer=fsdp").trainer.strategy._target_.endswith("FSDPStrategy")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="accelerator"):
            resolve_trainer(compose_cfg("trainer=gpu").trainer)


def test_method_configs_share_one_base(compose_cfg):
    """Every preference config gets the same pack/reference/optimiser block from one file."""
    from ptlight.config import config_dir

    family = [p.stem for p in (Path(config_dir()) / "method").glob("*.yaml")
              if "_base/preference" in p.read_text()]
    assert len(family) >= 13
    for name in family:
        method = compose_cfg(f"method={name}").method
        assert method.module == "preference" and method.pack == "auto", name
        assert method.optim.lr == 5.0e-5 and method.pack_max_tokens == 2048, name
