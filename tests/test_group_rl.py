"""The group-RL method (``method=grpo|dapo|dr_grpo|gspo|rloo|reinforce_pp|online_dpo``): the
arith task and its verifier, weighted reward plugins with unscorable completions, the rollout
engine, config checks before weights load, and short runs end to end."""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY, chat_prompt_ids, run_cli, tiny_chat_policy
from ptlight.errors import ConfigError, PluginError
from ptlight.rewards import Reward, WeightedRewards, build_rewards
from ptlight.tasks import arith

ARITH_TINY = [*TINY, "data=arith", "data.batch_size=4", "method.rollout.num_generations=4",
              "method.rollout.max_new_tokens=6"]


# ---- the arith task -----------------------------------------------------------------------------
@pytest.mark.parametrize("completion,expected", [
    ("432", 1.0), (" 432 ", 1.0), ("The answer is 432.", 1.0),
    ("322", 1 / 3),   # 47 + 385 with the carries forgotten: only the units digit is right
    ("4320", 0.0),    # an extra digit shifts every position
    ("32", 2 / 3),    # right-aligned: "3" and "2" match the tens and units; one digit missing
    ("no idea", 0.0),
])
def test_arith_verifier_gives_exact_and_right_aligned_partial_credit(completion, expected):
    assert arith.gold_reward("What is 47 + 385?", completion) == pytest.approx(expected)


def test_carryless_sum_and_carry_detection():
    assert arith.carryless_sum(47, 385) == 322 and arith.needs_carry(47, 385)
    assert arith.carryless_sum(12, 34) == 46 and not arith.needs_carry(12, 34)
    assert arith.carryless_sum(999, 1) == 990


def test_arith_splits_are_disjoint_in_either_order_and_demos_forget_carries_at_the_set_rate():
    train = arith.sample_problems(2000, 0, "train")
    held = arith.sample_problems(200, 0, "heldout")
    train_keys = {tuple(sorted(p)) for p in train}
    assert not train_keys & {tuple(sorted(p)) for p in held}
    rng = random.Random(0)
    carry = [p for p in train if arith.needs_carry(*p)]
    wrong = sum(arith.demonstration(a, b, rng, 0.5) != str(a + b) for a, b in carry)
    assert 0.4 < wrong / len(carry) < 0.6
    rows = arith.make_rows("sft", 50, 0, "heldout", forget_carry=1.0)
    for row in rows:  # held-out demonstrations are always correct
        prompt = row["prompt"][0]["content"]
        assert arith.gold_reward(prompt, row["completion"][0]["content"]) == 1.0
    pairs = arith.make_rows("pairwise", 50, 0, "train")
    for row in pairs:
        prompt = row["prompt"][0]["content"]
        assert arith.gold_reward(prompt, row["chosen"][0]["content"]) == 1.0
        assert arith.gold_reward(prompt, row["rejected"][0]["content"]) < 1.0
    with pytest.raises(ValueError, match="no data shape 'listwise'"):
        arith.make_rows("listwise", 4, 0, "train")


def test_arith_is_a_registered_task_with_carry_metrics():
    from types import SimpleNamespace

    from ptlight.tasks import available_tasks, resolve_task

    assert "arith" in available_tasks()
    task = resolve_task("arith")
    samples = [SimpleNamespace(prompt="What is 47 + 385?", completion="432"),
               SimpleNamespace(prompt="What is 18 + 5?", completion="13"),
               SimpleNamespace(prompt="What is 12 + 34?", completion="46")]
    assert task.gold_metrics(samples) == {"arith/carry_exact": 0.5, "arith/carryless_rate": 0.5}
    assert task.score([[{"role": "user", "content": "What is 2 + 2?"}]], ["4"]) == [1.0]


# ---- rewards: weighted plugins, unscorable completions, broken plugins ---------------------------
class _Fixed(Reward):
    name = "fixed"

    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions):
        if isinstance(self.values, Exception):
            raise self.values
        return self.values


def test_weighted_rewards_leave_out_unscorable_terms_and_mark_all_unscorable_as_nan():
    rewards = WeightedRewards([("a", 1.0, _Fixed([1.0, None, float("nan"), 0.5])),
                               ("b", 0.5, _Fixed([2.0, 4.0, None, 1.0]))])
    total, parts = rewards(["p"] * 4, ["c"] * 4)
    assert total[:2].tolist() == [2.0, 2.0] and total[3] == pytest.approx(1.0)
    assert math.isnan(total[2])  # no plugin scored it
    assert set(parts) == {"a", "b"} and math.isnan(parts["a"][1])


@pytest.mark.parametrize("values,match", [
    ([1.0], r"'a' returned 1 scores for 2 completions"),
    ([1.0, float("inf")], r"'a' returned an infinite reward"),
    (RuntimeError("verifier crashed"), r"'a' raised RuntimeError: verifier crashed"),
])
def test_a_broken_reward_plugin_is_an_error_that_names_it(values, match):
    with pytest.raises(PluginError, match=match):
        WeightedRewards([("a", 1.0, _Fixed(values))])(["p", "q"], ["x", "y"])


def test_reward_config_is_one_spec_or_a_weighted_list():
    one = build_rewards({"name": "gold", "task": "arith"})
    assert [(label, w) for label, w, _ in one.rewards] == [("gold", 1.0)]
    two = build_rewards([{"name": "gold", "task": "arith", "weight": 2.0},
                         {"name": "gold", "task": "arith", "weight": 0.5}])
    assert [(label, w) for label, w, _ in two.rewards] == [("gold", 2.0), ("gold_1", 0.5)]
    total, _ = two([[{"role": "user", "content": "What is 2 + 2?"}]], ["4"])
    assert total.item() == pytest.approx(2.5)
    with pytest.raises(ConfigError, match=r"reward\[0\]\.weight='x' is not a number"):
        build_rewards([{"name": "gold", "weight": "x"}])
    with pytest.raises(ConfigError, match=r"reward\[1\] must be a reward plugin spec"):
        build_rewards([{"name": "gold"}, "gold"])


# ---- rollout engine -------------------------------------------------------------------------------
def test_hf_engine_returns_contiguous_groups_cut_after_eos_and_padding_free_greedy_rows():
    from ptlight.data.module import left_pad
    from ptlight.engine.rollout import HFGenerate

    model, tok = tiny_chat_policy()
    ids = chat_prompt_ids(tok, ["What is 2 + 2?",
                                "What is 47 + 385? Answer with the number only."])
    batch = left_pad(ids, tok.pad_token_id)
    engine = HFGenerate()
    kw = dict(max_new_tokens=5, top_p=1.0, top_k=0, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    greedy = engine.generate(model, batch["input_ids"], batch["attention_mask"], n=3,
                             temperature=0.0, **kw)
    assert greedy.sequences.shape[0] == 6 and greedy.n_prompt == batch["input_ids"].shape[1]
    comp = greedy.completions
    assert torch.equal(comp[0], comp[1]) and torch.equal(comp[1], comp[2])  # one group
    for row, single in enumerate(ids):  # a padded row decodes as the prompt alone
        one = torch.tensor([single])
        alone = engine.generate(model, one, torch.ones_like(one), n=1, temperature=0.0, **kw)
        assert alone.completions[0].tolist() == comp[row * 3].tolist()
    sampled = engine.generate(model, batch["input_ids"], batch["attention_mask"], n=4,
                              temperature=1.0, **kw)
    mask, eos = sampled.completion_mask, tok.eos_token_id
    assert sampled.num_tokens == int(mask.sum()) and sampled.seconds > 0
    for c, m, has in zip(sampled.completions, mask, sampled.has_eos):
        valid = c[m].tolist()
        assert (eos in valid) == bool(has)
        if has:  # cut after the first EOS, the rest is padding
            assert valid.index(eos) == len(valid) - 1
        assert torch.equal(sampled.attention_mask[:, sampled.n_prompt:].bool(), mask)


def test_rollout_engines_are_a_plugin_group():
    from ptlight.engine.rollout import build_engine
    from omegaconf import OmegaConf

    assert type(build_engine(OmegaConf.create({"engine": "hf", "engine_args": {}}))).__name__ \
        == "HFGenerate"
    with pytest.raises(ConfigError, match=r"method\.rollout\.engine: unknown rollout engine 'vllm'.*hf"):
        build_engine(OmegaConf.create({"engine": "vllm", "engine_args": {}}))
    with pytest.raises(ConfigError, match=r"method\.rollout\.engine_args.*cache"):
        build_engine(OmegaConf.create({"engine": "hf", "engine_args": {"cache": "static"}}))


# ---- config checks before weights load ------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (["method=grpo", "method.rollout.num_generations=1"], r"num_generations=1.*at least 2"),
    (["method=online_dpo", "method.rollout.num_generations=4"], r"online_dpo judges a pair"),
    (["method=grpo", "method.rollout.num_mini_batches=3"], r"num_mini_batches=3 must divide"),
    (["method=grpo", "method.rollout.top_p=0"],
     r"method\.rollout\.top_p=0: nucleus sampling .* a number in \(0, 1\]"),
    (["method=rloo", "method.rollout.top_k=-1"],
     r"method\.rollout\.top_k=-1: sample from the k most likely tokens, a whole number >= 1; "
     r"method\.rollout\.top_k=0 turns the filter off"),
    (["method=grpo", "trainer.gradient_clip_val=-1"], r"trainer\.gradient_clip_val=-1"),
    (["method=grpo", "method.objective.beta=0.1", "method.reference=precompute"],
     r"nothing to precompute"),
    (["method=grpo", "method.objective.loss_type=nope"], r"loss_type"),
    (["method=grpo", "reward.name=nope"], r"unknown reward 'nope'"),
])
def test_group_rl_config_mistakes_fail_before_weights_load(compose_cfg, tmp_path, monkeypatch,
                                                           overrides, match):
    import ptlight.train as train
    from ptlight.train import train_stage

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(train, "build_policy", no_weights)
    with pytest.raises((ConfigError, KeyError), match=match):
        train_stage(compose_cfg("data=arith", *overrides), tmp_path)


def test_grpo_builds_a_reference_only_when_beta_is_positive(compose_cfg):
    from ptlight.model.reference import reference_mode
    from ptlight.train import build_stage_objective

    cfg = compose_cfg("method=grpo")
    assert reference_mode(cfg.method, cfg.model, build_stage_objective(cfg)) == "none"
    cfg = compose_cfg("method=grpo", "method.objective.beta=0.04")
    assert reference_mode(cfg.method, cfg.model, build_stage_objective(cfg)) == "copy"
    cfg = compose_cfg("method=grpo", "method.objective.beta=0.04", "model.lora.enabled=true")
    assert reference_mode(cfg.method, cfg.model, build_stage_objective(cfg)) == "adapter"


# ---- end to end ------------------------------------------------------------------------------------
def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("grpo", ["method.objective.beta=0.04", "method.rollout.num_iterations=2"]),
    ("reinforce_pp", []),
    ("online_dpo", ["method.rollout.num_generations=2"]),
])
def test_short_group_rl_runs_log_trl_metrics_samples_and_plots(tmp_path, method, extra):
    run_dir = tmp_path / method
    proc = run_cli(f"method={method}", *ARITH_TINY, *extra, f"hydra.run.dir={run_dir}",
                   "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(run_dir)
    train = [r for r in rows if r.get("train/reward")]
    assert train
    keys = ["reward", "reward_std", "frac_reward_zero_std", "rewards/gold/mean",
            "completions/mean_length", "completions/clipped_ratio", "rollout/tokens_per_s",
            "entropy", "loss"]
    if method != "online_dpo":
        keys += ["clip_ratio/region_mean"]
    if method == "grpo":
        keys += ["kl"]
    for r in train:
        for key in keys:
            assert math.isfinite(float(r[f"train/{key}"])), key
    assert float(train[0]["train/rollout/tokens_per_s"]) > 0
    assert [r for r in rows if r.get("val/reward")]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["global_step"] == 4 and report["skipped_steps"] == 0
    assert (run_dir / "samples.jsonl").is_file()
    assert (run_dir / "grpo.png").stat().st_size > 0


@pytest.mark.slow
def test_a_resumed_grpo_run_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    common = ["method=grpo", *ARITH_TINY, "eval.before=false", "eval.val_samples=0",
              "checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2",
              "method.rollout.num_mini_batches=2"]
    straight = run_cli(*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli(*common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'b'}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(*common, "trainer.max_steps=4", "ckpt_path=last",
                      f"hydra.run.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "a" / "export" / "model.safetensors")
    b = load_file(tmp_path / "b" / "export" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_task_args_shape_the_held_out_prompts_too(compose_cfg):
    """data.task_args define arith's distribution: the gold eval's held-out prompts follow it."""
    from ptlight.tasks import resolve_task

    cfg = compose_cfg("data=arith", "data.task_args.min_digits=3", "data.task_args.max_digits=3")
    task = resolve_task(cfg.data.task, args=cfg.data.task_args)
    prompts = [r["prompt"][0]["content"] for r in task.make_rows("prompt", 50, 1234, "heldout")]
    assert all(a >= 100 and b >= 100 for a, b in map(arith.operands, prompts))


@pytest.mark.slow
def test_grpo_trains_under_ddp_on_two_gloo_processes(tmp_path):
    """Each rank samples its own prompts' groups; the dapo normaliser is summed over ranks."""
    from helpers import REPO

    run_dir = tmp_path / "ddp"
    proc = run_cli("method=grpo", *ARITH_TINY, "trainer=ddp", "trainer.devices=2",
                   "data.batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "eval.before=false", "eval.val_samples=0", f"hydra.run.dir={run_dir}",
                   cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 2
    train = [r for r in _rows(run_dir) if r.get("train/reward")]
    assert train and all(math.isfinite(float(r["train/loss"])) for r in train)


@pytest.mark.slow
def test_lora_grpo_uses_the_policy_with_adapters_off_as_its_reference(tmp_path):
    run_dir = tmp_path / "lora"
    proc = run_cli("method=grpo", *ARITH_TINY, "model.lora.enabled=true",
                   "method.objective.beta=0.04", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "eval.before=false", "eval.val_samples=0",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in _rows(run_dir) if r.get("train/kl")]
    assert train and all(math.isfinite(float(r["train/kl"])) for r in train)
    assert (run_dir / "export" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_rl_pack_benchmark_script_runs_both_ways(tmp_path):
    """``scripts/bench_rl_pack.py`` at a smoke size: an SFT export, then grpo with the
    scoring padded and packed, one table row each."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_rl_pack.py"),
                          "--sft-steps", "2", "--steps", "1", "--batch-size", "2",
                          "--repeats", "1", "--eval-prompts", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln.strip("| ").split(" | ") for ln in out.stdout.splitlines()
            if ln.startswith("| ") and not ln.startswith("| method")]
    assert [r[0] for r in rows] == ["false", "true"]
    assert all(float(r[1]) > 0 and float(r[3]) > 0 and 0 <= float(r[5]) <= 1 for r in rows)


@pytest.mark.slow
def test_grpo_trains_packed_under_ddp_on_two_cpu_processes(tmp_path):
    """grpo on two gloo processes with its scoring packed (the CPU default): each rank packs
    its own rollouts, the advantages span both ranks, and the run trains, with every step
    taken, and exports finite weights."""
    run_dir = tmp_path / "ddp"
    out = run_cli(*TINY, "method=grpo", "trainer=ddp", "trainer.accelerator=cpu",
                  "trainer.devices=2", "data.batch_size=2", "eval.before=false",
                  "eval.num_prompts=4", "eval.val_samples=0", f"hydra.run.dir={run_dir}",
                  cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    assert "pack: true" in config
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] > 0
    assert report["skipped_steps"] == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert all(torch.isfinite(p).all() for p in model.parameters())
