"""LoRA / QLoRA through peft: what trains, the reference without a copy, exports, re-training.

One SFT-with-LoRA stage (module fixture) serves the export, reload and re-training tests; the
policy each stage builds is captured by wrapping ``ptlight.train.build_policy``.
"""

import csv
import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import ptlight.model.backbone as backbone
import ptlight.train
from helpers import REPO, TINY, run_cli
from ptlight.model.backbone import build_policy, load_tokenizer, parameter_counts
from ptlight.model.reference import AdapterReference
from ptlight.errors import ConfigError
from ptlight.engine.logps import completion_logps
from ptlight.train import train_stage

LORA = ["model.lora.enabled=true", "eval.before=false", *TINY]


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _no_frozen_copy(*args, **kwargs):
    raise AssertionError("a frozen copy was built although LoRA provides the reference")


class Captured:
    """Wraps ``build_policy``: keeps the policy and a copy of its starting state dict."""

    def __init__(self):
        self.policy, self.start = None, {}

    def __call__(self, model_cfg, tokenizer):
        self.policy = build_policy(model_cfg, tokenizer)
        self.start = {k: v.clone() for k, v in self.policy.state_dict().items()}
        return self.policy

    def changed(self) -> set[str]:
        now = self.policy.state_dict()
        return {k for k, v in now.items() if not torch.equal(v, self.start[k])}


def _stage(compose_cfg, run_dir, *overrides, monkeypatch):
    captured = Captured()
    monkeypatch.setattr(ptlight.train, "build_policy", captured)
    monkeypatch.setattr(backbone, "frozen_copy", _no_frozen_copy)
    report = train_stage(compose_cfg(*overrides), run_dir)
    return report, captured


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """SFT with LoRA (merge on) on the tiny model: (run dir, captured policy)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ptlight.config import config_dir

    run_dir = tmp_path_factory.mktemp("sft-lora")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"), \
            pytest.MonkeyPatch.context() as mp:
        cfg = compose("config", overrides=["method=sft", "model.lora.merge=true", *LORA])
        captured = Captured()
        mp.setattr(ptlight.train, "build_policy", captured)
        mp.setattr(backbone, "frozen_copy", _no_frozen_copy)
        train_stage(cfg, run_dir)
    GlobalHydra.instance().clear()
    return run_dir, captured


def test_lora_trains_only_adapters_on_every_block_projection(compose_cfg):
    cfg = compose_cfg("model.lora.enabled=true")  # lfm2-tiny at its real size, r=16
    tok = load_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok)
    r, targets = cfg.model.lora.r, backbone.DEFAULT_TARGET_MODULES["lfm2"]
    expected, adapted = 0, set()
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and name.rsplit(".", 1)[-1] in targets:
            base = module.base_layer
            expected += r * (base.in_features + base.out_features)  # A: r x in, B: out x r
            adapted.add(name.rsplit(".", 1)[-1])
    trainable, total = parameter_counts(policy)
    assert adapted == set(targets)  # attention q/k/v/out, conv in/out, MLP w1/w2/w3
    assert trainable == expected and trainable / total < 0.15
    assert all(("lora_" in n) == p.requires_grad for n, p in policy.named_parameters())


def test_disabled_adapters_give_exactly_the_base_logps(compose_cfg):
    cfg = compose_cfg("model.lora.enabled=true", *TINY)
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    policy = build_policy(cfg.model, tok)
    base_cfg = compose_cfg(*TINY)
    torch.manual_seed(0)
    base = build_policy(base_cfg.model, tok).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained adapter: the policy now differs from the base
    ids = torch.randint(3, 600, (2, 12))
    attn, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = completion_logps(base, ids, attn, mask).sequence_sum()
        adapted = completion_logps(policy.eval(), ids, attn, mask).sequence_sum()
        with AdapterReference(policy).scope() as reference:
            off = completion_logps(reference, ids, attn, mask).sequence_sum()
        again = completion_logps(policy, ids, attn, mask).sequence_sum()
    assert not torch.allclose(adapted, expected)
    assert torch.equal(off, expected)
    assert torch.equal(again, adapted)  # adapters back on after the scope
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_preference_with_lora_builds_no_copy_and_trains_adapters(compose_cfg, tmp_path,
                                                                 monkeypatch, method):
    report, captured = _stage(compose_cfg, tmp_path, f"method={method}",
                              "method.optim.lr=1e-3", *LORA, monkeypatch=monkeypatch)
    losses = _losses(tmp_path)
    assert report["global_step"] == 3 and all(math.isfinite(v) for v in losses)
    if method == "dpo":  # adapters start at B = 0: policy == reference
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    changed = captured.changed()
    assert changed and all("lora_" in k for k in changed)  # the base never moves


def test_precomputed_reference_with_lora_matches_the_adapter_reference(compose_cfg, tmp_path,
                                                                       monkeypatch):
    runs = {}
    for mode in ("copy", "precompute"):  # copy becomes adapter under LoRA
        _stage(compose_cfg, tmp_path / mode, "method=dpo", f"method.reference={mode}",
               "method.optim.lr=1e-3", *LORA, monkeypatch=monkeypatch)
        runs[mode] = _losses(tmp_path / mode)
    assert runs["copy"] == pytest.approx(runs["precompute"], abs=1e-5)
    assert runs["copy"][0] == pytest.approx(math.log(2), abs=1e-6)


def test_sft_with_lora_trains_adapters_only(sft_run):
    _, captured = sft_run
    changed = captured.changed()
    assert changed and all("lora_" in k for k in changed)


def test_adapter_export_reloads_with_peft_and_matches(sft_run):
    run_dir, captured = sft_run
    export = run_dir / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((export / "base").resolve())
    assert not (export / "model.safetensors").exists()  # adapter only, not the full weights
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    reloaded = PeftModel.from_pretrained(base, export).eval()
    integrated = AutoModelForCausalLM.from_pretrained(export).eval()  # transformers' peft support
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        trained = captured.policy.eval()(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=0, rtol=0)
        torch.testing.assert_close(integrated(ids).logits, trained, atol=0, rtol=0)


def test_merged_export_reloads_with_plain_transformers(sft_run):
    run_dir, captured = sft_run
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, captured.policy.eval()(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_retraining_an_adapter_keeps_the_starting_adapter_as_reference(sft_run, compose_cfg,
                                                                       tmp_path, monkeypatch):
    export = sft_run[0] / "export"
    report, captured = _stage(compose_cfg, tmp_path, "method=dpo", f"model.path={export}",
                              "method.optim.lr=1e-3", *LORA, monkeypatch=monkeypatch)
    assert _losses(tmp_path)[0] == pytest.approx(math.log(2), abs=1e-6)
    start = captured.start
    sft_adapter = {k for k in start if ".lora_B.default." in k}
    assert sft_adapter and all(start[k].abs().sum() > 0 for k in sft_adapter)  # not a fresh one
    for k in sft_adapter:
        assert torch.equal(start[k], start[k.replace(".default.", ".reference.")])
    changed = captured.changed()
    assert changed and all(".default." in k for k in changed)  # reference and base frozen
    saved = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((export / "base").resolve())


def test_resuming_a_lora_run_from_its_checkpoint(sft_run, compose_cfg, tmp_path):
    ckpt = sft_run[0] / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("method=sft", f"ckpt_path={ckpt}", *LORA, "trainer.max_steps=4")
    assert train_stage(cfg, tmp_path)["global_step"] == 4
    assert len(_losses(tmp_path)) == 1  # steps 1-3 came from the checkpoint (strictly loaded)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.enabled=true", "model.lora.quantize=4bit"], "needs a CUDA GPU"),
    (["model.lora.quantize=4bit"], "also set model.lora.enabled=true"),
    (["model.lora.enabled=true", "model.lora.quantize=8bit"], "use null or 4bit"),
])
def test_qlora_config_errors_come_before_any_weights_load(compose_cfg, tmp_path, monkeypatch,
                                                          overrides, message):
    class NoWeights:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("weights loaded before the quantization check")

        from_config = from_pretrained

    monkeypatch.setattr(backbone, "AutoModelForCausalLM", NoWeights)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg("method=dpo", *overrides, *TINY)
    with pytest.raises(ConfigError, match=message):
        train_stage(cfg, tmp_path)


def test_adapter_reference_without_lora_is_an_error(compose_cfg, tmp_path):
    cfg = compose_cfg("method=dpo", "method.reference=adapter", *TINY)
    with pytest.raises(ConfigError, match="model.lora.enabled=true"):
        train_stage(cfg, tmp_path)


@pytest.mark.slow
def test_cli_pipeline_with_lora_retrains_the_sft_adapter(tmp_path):
    """`python -m ptlight model.lora.enabled=true`: SFT trains an adapter, DPO trains it on."""
    proc = run_cli(f"hydra.run.dir={tmp_path}", "model.lora.enabled=true",
                   "model.lora.merge=true", *TINY, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sft, dpo = tmp_path / "0-sft" / "export", tmp_path / "1-dpo" / "export"
    assert f"path: {sft}" in (tmp_path / "1-dpo" / "config.yaml").read_text()
    assert _losses(tmp_path / "1-dpo")[0] == pytest.approx(math.log(2), abs=1e-6)
    base = AutoModelForCausalLM.from_pretrained(sft / "base")
    adapted = PeftModel.from_pretrained(base, dpo).eval()
    merged = AutoModelForCausalLM.from_pretrained(dpo / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_reward_model_with_lora_trains_adapters_and_head_and_reloads(compose_cfg, tmp_path,
                                                                     monkeypatch):
    from ptlight.rewards import build_reward

    report, captured = _stage(compose_cfg, tmp_path, "method=rm", "method.optim.lr=1e-3",
                              "eval.num_pairs=8", *LORA, monkeypatch=monkeypatch)
    changed = captured.changed()
    assert changed and all("lora_" in k for k in changed)  # the backbone's base never moves
    export = tmp_path / "export"
    assert (export / "adapter_config.json").is_file() and (export / "reward_head.safetensors").is_file()
    head = __import__("safetensors.torch").torch.load_file(str(export / "reward_head.safetensors"))
    assert head["weight"].abs().sum() > 0
    reward = build_reward({"name": "reward_model", "path": str(export)})  # adapter merged on load
    prompt = [{"role": "user", "content": "Sort these words alphabetically: b a"}]
    assert torch.isfinite(reward([prompt, prompt], ["a b", "b a"])).all()


def test_ppo_with_lora_takes_the_reference_from_the_disabled_adapters(compose_cfg, tmp_path,
                                                                      monkeypatch):
    report, captured = _stage(compose_cfg, tmp_path, "method=ppo", "method.optim.lr=1e-3",
                              "method.ppo.max_new_tokens=6", *LORA, monkeypatch=monkeypatch)
    changed = captured.changed()
    assert changed and all("lora_" in k for k in changed)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/objective/kl")]
    assert float(rows[0]["train/objective/kl"]) == pytest.approx(0.0, abs=1e-5)  # B = 0 at start
    assert float(rows[0]["train/first_ratio"]) == pytest.approx(1.0, abs=1e-5)
    value = __import__("safetensors.torch").torch.load_file(str(tmp_path / "export" / "value_head.safetensors"))
    assert value["weight"].abs().sum() > 0  # the value head trained alongside the adapter
