"""Where a run trains (ptlight.runtime.devices): CUDA + bf16-mixed when present, else the CPU in fp32;
what the user sets is checked against the machine before any weights load."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, TINY, run_cli
from ptlight.runtime.devices import resolve_trainer
from ptlight.errors import ConfigError


def _gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    """Pretend ``count`` CUDA GPUs are visible (with or without bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_defaults_are_the_cpu_in_fp32_without_a_gpu(compose_cfg, monkeypatch):
    _gpus(monkeypatch, 0)
    cfg = compose_cfg()
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("auto", "auto")
    resolved = resolve_trainer(cfg.trainer)
    assert (resolved.accelerator, resolved.precision) == ("cpu", "32-true")


def test_defaults_are_the_gpu_in_bf16_mixed_with_one(compose_cfg, monkeypatch):
    _gpus(monkeypatch, 2)
    resolved = resolve_trainer(compose_cfg().trainer)
    assert (resolved.accelerator, resolved.precision) == ("gpu", "bf16-mixed")
    _gpus(monkeypatch, 1, bf16=False)  # pre-Ampere: fp32 unless the user says otherwise
    assert resolve_trainer(compose_cfg().trainer).precision == "32-true"


def test_what_the_user_sets_is_kept(compose_cfg, monkeypatch):
    _gpus(monkeypatch, 2)
    resolved = resolve_trainer(compose_cfg("trainer.accelerator=cpu",
                                           "trainer.precision=bf16-mixed").trainer)
    assert (resolved.accelerator, resolved.precision) == ("cpu", "bf16-mixed")
    resolved = resolve_trainer(compose_cfg("trainer=ddp", "trainer.precision=32-true").trainer)
    assert (resolved.accelerator, resolved.precision, resolved.devices) == ("gpu", "32-true", 2)


@pytest.mark.parametrize("gpus,bf16,overrides,message", [
    (0, True, ["trainer.accelerator=gpu"], r"trainer\.accelerator=gpu but no CUDA GPU"),
    (1, True, ["trainer.devices=4"], r"trainer\.devices=4 but 1 CUDA GPU\(s\) are visible"),
    (2, True, ["trainer.devices=[0,1,2]"], r"trainer\.devices=\[0, 1, 2\] but 2 CUDA"),
    (1, False, ["trainer.precision=bf16-mixed"], r"Tesla V100\) has no bf16 support"),
    (0, True, ["trainer.precision=fp8"], r"trainer\.precision='fp8'; use auto"),
    (0, True, ["trainer.devices=two"], r"trainer\.devices='two'"),
])
def test_settings_the_machine_cannot_serve_are_refused(compose_cfg, monkeypatch, gpus, bf16,
                                                      overrides, message):
    _gpus(monkeypatch, gpus, bf16)
    with pytest.raises(ConfigError, match=message):
        resolve_trainer(compose_cfg(*overrides).trainer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.slow
def test_asking_for_a_gpu_without_one_fails_before_weights_load(tmp_path):
    out = run_cli(*TINY, "method=sft", "trainer.accelerator=gpu", f"hydra.run.dir={tmp_path}",
                  cwd=REPO)
    assert out.returncode == 2
    assert "trainer.accelerator=gpu but no CUDA GPU is visible" in out.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_the_saved_config_records_the_resolved_device(tmp_path):
    out = run_cli(*TINY, "method=sft", "trainer.max_steps=1", "eval.before=false",
                  "eval.val_samples=0", f"hydra.run.dir={tmp_path}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = (tmp_path / "config.yaml").read_text()
    expected = ("gpu", "bf16-mixed") if torch.cuda.is_available() else ("cpu", "32-true")
    assert f"accelerator: {expected[0]}" in saved and f"precision: {expected[1]}" in saved


def test_optimizer_offload_on_a_gpu_is_refused_before_weights_load(compose_cfg, monkeypatch,
                                                                   tmp_path):
    from ptlight.train import train_stage

    _gpus(monkeypatch, 1)
    cfg = compose_cfg(*TINY, "method=sft", f"optimizer_offload={tmp_path}")
    loaded = []
    monkeypatch.setattr("ptlight.train.build_policy", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError, match=r"optimizer_offload .* CUDA GPU"):
        train_stage(cfg, tmp_path / "run")
    assert not loaded


def test_packing_auto_packs_on_the_cpu_and_on_gpus(monkeypatch):
    from omegaconf import OmegaConf

    from helpers import tiny_model_cfg
    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.methods.preference import PreferenceMethod
    from ptlight.objectives import build_objective

    cfg = tiny_model_cfg()
    policy = build_policy(cfg, load_tokenizer(cfg))
    optim = OmegaConf.create({})

    def method(pack):
        return PreferenceMethod(policy, build_objective("dpo", {}), optim, pack=pack)

    auto = method("auto")
    assert auto.packs  # the CPU: 5x the padded step (docs/performance.md)
    monkeypatch.setattr(PreferenceMethod, "device", property(lambda self: torch.device("cuda")))
    assert auto.packs  # an H200: 1.46x with a precomputed reference
    assert method(True).packs and not method(False).packs
    with pytest.raises(ConfigError, match=r"method\.pack='yes'; use auto, true or false"):
        method("yes")


def _settled(compose_cfg, tmp_path, *overrides, train_rows=100):
    """The stage config after ``train_stage``'s settling for the machine and for a train split
    of ``train_rows`` rows (100 steps of 8 pairs cover 100), and what config.yaml says."""
    from ptlight.methods import get_method
    from ptlight.train import _settle, _settle_with_data

    overrides = ("trainer.max_steps=100", "data.batch_size=8", *overrides)
    cfg, objective = _settle(compose_cfg(*TINY, *overrides), tmp_path, list(overrides))
    cfg = _settle_with_data(cfg, tmp_path, objective, get_method(cfg.method.module), train_rows)
    return cfg, (tmp_path / "config.yaml").read_text()


def test_auto_settings_follow_the_device(compose_cfg, monkeypatch, tmp_path):
    """On one CUDA GPU the DPO step measured fastest without compiling (docs/performance.md) is
    the default: a precomputed reference, packed rows in widths of steps of 128, 2 collate
    workers; on the CPU the CPU's settings; under several GPU processes, or for a run shorter
    than an epoch, the padded GPU step those were measured and tested with. config.yaml
    records the resolved values."""
    monkeypatch.setattr("ptlight.train.configure_cuda", lambda *a: None)
    _gpus(monkeypatch, 1)
    cfg, saved = _settled(compose_cfg, tmp_path / "gpu", "method=dpo")
    assert (cfg.method.reference, cfg.method.pack, cfg.method.pack_multiple_of,
            cfg.data.num_workers, cfg.model.compile, cfg.model.fused_norm
            ) == ("precompute", True, 128, 2, False, True)
    assert "reference: precompute" in saved and "pack_multiple_of: 128" in saved
    assert "fused_norm: true" in saved
    assert cfg.model.fuse_projections == "auto"  # settled by the model's width once it loads
    _gpus(monkeypatch, 0)
    cfg, saved = _settled(compose_cfg, tmp_path / "cpu", "method=dpo")
    assert (cfg.method.reference, cfg.method.pack, cfg.method.pack_multiple_of,
            cfg.data.num_workers, cfg.model.fused_norm) == ("copy", True, 1, 0, False)
    assert "pack: true" in saved and "num_workers: 0" in saved and "fused_norm: false" in saved
    assert "fuse_projections: false" in saved
    _gpus(monkeypatch, 2)  # several processes: packing and precompute were measured on one GPU
    cfg, _ = _settled(compose_cfg, tmp_path / "fsdp", "method=dpo", "trainer=fsdp")
    assert (cfg.method.reference, cfg.method.pack, cfg.data.num_workers) == ("copy", False, 0)
    assert cfg.model.fuse_projections is False  # FSDP gathers and casts the weights itself
    _gpus(monkeypatch, 1)  # a run shorter than an epoch: precompute would score unused rows
    cfg, saved = _settled(compose_cfg, tmp_path / "short", "method=dpo", train_rows=801)
    assert (cfg.method.reference, cfg.method.pack, cfg.data.num_workers) == ("copy", False, 0)
    assert "reference: copy" in saved and "pack: false" in saved
    cfg, _ = _settled(compose_cfg, tmp_path / "epochs", "method=dpo", "trainer.max_steps=-1",
                      "trainer.max_epochs=1", train_rows=10**6)
    assert (cfg.method.reference, cfg.method.pack) == ("precompute", True)
    for accumulate, reference in ((1, "copy"), (2, "precompute")):  # 60 x 8 x accumulate >= 900?
        cfg, _ = _settled(compose_cfg, tmp_path / f"acc{accumulate}", "method=dpo",
                          "trainer.max_steps=60", f"trainer.accumulate_grad_batches={accumulate}",
                          train_rows=900)
        assert cfg.method.reference == reference


@pytest.mark.parametrize("method, section, auto", [("grpo", "rollout", []),
                                                   ("rloo", "rollout", []),
                                                   ("ppo", "ppo", ["method.ppo.pack=auto"])])
def test_rl_scoring_packs_on_the_cpu_only_unless_told(compose_cfg, monkeypatch, tmp_path,
                                                      method, section, auto):
    """The RL methods' packed scoring (``method.rollout.pack``, default auto;
    ``method.ppo.pack``, default false) at auto: on the CPU, where it was measured; off on a
    CUDA GPU, where it was not; what the user sets is kept, and anything but auto/true/false
    is refused before weights load."""
    monkeypatch.setattr("ptlight.train.configure_cuda", lambda *a: None)
    if method == "ppo":  # no faster on the CPU where measured: off unless asked
        _gpus(monkeypatch, 0)
        assert _settled(compose_cfg, tmp_path / "ppo", "method=ppo")[0].method.ppo.pack is False
    for gpus, packs in ((0, True), (1, False)):
        _gpus(monkeypatch, gpus)
        cfg, saved = _settled(compose_cfg, tmp_path / f"{gpus}", f"method={method}", *auto)
        assert cfg.method[section].pack is packs and f"pack: {str(packs).lower()}" in saved
        cfg, _ = _settled(compose_cfg, tmp_path / f"{gpus}-set", f"method={method}",
                          f"method.{section}.pack={str(not packs).lower()}")
        assert cfg.method[section].pack is (not packs)
    _gpus(monkeypatch, 0)
    out = run_cli(*TINY, f"method={method}", f"method.{section}.pack=yes", "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path / 'bad'}", cwd=REPO)
    assert out.returncode != 0
    assert f"method.{section}.pack='yes'" in out.stderr and "use auto, true or false" in out.stderr
    assert "Traceback" not in out.stderr  # the message alone, before the policy is built


@pytest.mark.parametrize("gpus,overrides,reference", [
    (1, ["method=kto"], "copy"),            # unpaired rows: precompute cannot serve them
    (1, ["method=tdpo"], "copy"),           # per-token reference terms
    (2, ["method=dpo", "trainer=ddp"], "copy"),  # several processes: not the measured case
    (1, ["method=dpo", "method.reference=copy"], "copy"),  # what the user sets is kept
    (1, ["method=dpo", "model.lora.enabled=true"], "precompute"),
])
def test_auto_reference_precomputes_only_where_it_can_serve(compose_cfg, monkeypatch, tmp_path,
                                                            gpus, overrides, reference):
    monkeypatch.setattr("ptlight.train.configure_cuda", lambda *a: None)
    _gpus(monkeypatch, gpus)
    cfg, _ = _settled(compose_cfg, tmp_path, *overrides)
    assert cfg.method.reference == reference


def test_user_settings_of_the_auto_keys_are_kept_on_a_gpu(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setattr("ptlight.train.configure_cuda", lambda *a: None)
    _gpus(monkeypatch, 1)
    cfg, _ = _settled(compose_cfg, tmp_path, "method=dpo", "model.compile=true",
                      "data.num_workers=0", "method.pack_multiple_of=1", "method.pack=false",
                      "model.fused_norm=false")
    assert (cfg.model.compile, cfg.data.num_workers, cfg.method.pack_multiple_of,
            cfg.method.pack, cfg.model.fused_norm) == (True, 0, 1, False, False)
    assert cfg.model.fuse_projections is False  # auto: compiled layers plan their own matmuls


def test_fused_adamw_on_cuda_for_every_method_and_on_cpu_where_the_method_asks():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ptlight.methods.common import configure_optim

    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95],
                            "scheduler": "constant", "warmup_ratio": 0.0})

    class Module(torch.nn.Linear):
        trainer = SimpleNamespace(estimated_stepping_batches=10)

    def fused(**kwargs):
        groups = configure_optim(Module(2, 2), cfg, **kwargs)["optimizer"].param_groups
        return {g["fused"] for g in groups}

    assert fused(fused_on_cpu=True) == {True}  # the preference methods on the CPU
    assert fused() == {None}  # sft/rm/ppo on the CPU: torch's default (their result tables)


def test_gpu_runs_keep_sdpa_off_cudnn_unless_asked(monkeypatch):
    from ptlight.runtime.devices import configure_cuda

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    configure_cuda(False)
    configure_cuda(True)
    assert calls == [False, True]
    with pytest.raises(ConfigError, match=r"cudnn_attention='no'; use true or false"):
        configure_cuda("no")
