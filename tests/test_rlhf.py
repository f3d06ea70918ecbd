"""RLHF: the reward_bt and ppo objectives against hand-computed values, the RL building
blocks (GAE, KL estimators and controller, EOS handling), batched rollouts vs one prompt at a
time, reward plugins, and short rm / ppo runs through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, TINY, chat_prompt_ids, run_cli, tiny_chat_policy, tiny_model_cfg

from ptlight.errors import ConfigError, ModelLoadError
from ptlight.engine.packing import packed_hidden, rollout_layout
from ptlight.engine.rollout import completion_mask
from ptlight.methods.ppo import position_ids, token_scores
from ptlight.objectives import Rewards, Rollout, build_objective, get_objective
from ptlight.rewards import Reward, available_rewards, build_reward, get_reward
from ptlight.methods.rl import (AdaptiveKLController, FixedKLController, gae, kl_penalty,
                        masked_whiten, token_rewards)


# ---- reward_bt ------------------------------------------------------------------------------
def test_reward_bt_pairwise_matches_the_formula_with_margin_and_centering():
    r = torch.tensor([[1.0, -0.5], [0.2, 0.4]])
    m = torch.tensor([0.5, 0.0])
    out = build_objective("reward_bt", {"center_rewards_coefficient": 0.01})(
        Rewards(rewards=r, margins=m))
    delta = torch.tensor([1.5, -0.2])
    expected = -F.logsigmoid(delta - m) + 0.01 * torch.tensor([0.5 ** 2, 0.6 ** 2])
    torch.testing.assert_close(out.losses, expected)
    assert out.loss.item() == pytest.approx(expected.mean().item())
    assert out.metrics["accuracy"].item() == 0.5
    assert out.metrics["margin"].item() == pytest.approx(0.65)
    assert out.metrics["min_reward"].item() == -0.5 and out.metrics["max_reward"].item() == 1.0


def test_reward_bt_at_equal_rewards_is_ln2():
    out = get_objective("reward_bt")()(Rewards(rewards=torch.zeros(4, 2)))
    assert out.loss.item() == pytest.approx(math.log(2))


def test_reward_bt_k_way_is_the_mean_over_all_pairs_and_drops_ties():
    r = torch.tensor([[2.0, 0.5, 1.0, -1.0]])
    scores = torch.tensor([[3.0, 2.0, 2.0, 0.0]])  # columns 1 and 2 tie
    out = get_objective("reward_bt")()(Rewards(rewards=r, scores=scores))
    pairs = [(i, j) for i, j in itertools.combinations(range(4), 2) if (i, j) != (1, 2)]
    expected = sum(-F.logsigmoid(r[0, i] - r[0, j]) for i, j in pairs) / 6  # 1/C(4,2) each
    assert out.loss.item() == pytest.approx(expected.item())
    # K = 2 listwise is exactly the pairwise loss
    pair = torch.tensor([[0.3, 0.9]])
    a = get_objective("reward_bt")()(Rewards(rewards=pair))
    b = get_objective("reward_bt")()(Rewards(rewards=pair, scores=torch.tensor([[1.0, 0.0]])))
    assert a.loss.item() == b.loss.item() == pytest.approx(F.softplus(torch.tensor(0.6)).item())


def test_reward_bt_gradient_raises_chosen_and_lowers_rejected():
    r = torch.zeros(3, 2, requires_grad=True)
    get_objective("reward_bt")()(Rewards(rewards=r)).loss.backward()
    assert (r.grad[:, 0] < 0).all() and (r.grad[:, 1] > 0).all()


# ---- ppo objective and RL blocks -------------------------------------------------------------
def _rollout(logps, old_logps, values=None, old_values=None, adv=None, ret=None, mask=None):
    shape = logps.shape
    z = torch.zeros(shape)
    return Rollout(logps=logps, old_logps=old_logps,
                   values=z if values is None else values,
                   old_values=z if old_values is None else old_values,
                   advantages=z if adv is None else adv, returns=z if ret is None else ret,
                   mask=torch.ones(shape, dtype=torch.bool) if mask is None else mask)


def test_ppo_policy_loss_is_minus_mean_advantage_at_ratio_one_and_clips():
    ppo = get_objective("ppo")(cliprange=0.2, vf_coef=0.0)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    same = torch.tensor([[-1.0, -2.0, -0.5]])
    out = ppo(_rollout(same, same, adv=adv))
    assert out.metrics["loss/policy"].item() == pytest.approx(-adv.mean().item())
    assert out.metrics["val/ratio"].item() == 1.0 and out.metrics["policy/clipfrac"].item() == 0
    # ratio e^0.5 > 1.2 with A > 0: clipped at 1.2 -> -1.2·A; A < 0 takes the unclipped -A·ratio
    new = same + torch.tensor([[0.5, 0.5, -0.5]])
    out = ppo(_rollout(new, same, adv=adv))
    r = math.exp(0.5)
    expected = (-1.0 * 1.2 + 2.0 * r + max(-0.5 * math.exp(-0.5), -0.5 * 0.8)) / 3
    assert out.metrics["loss/policy"].item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["policy/clipfrac"].item() == pytest.approx(1 / 3)  # only token 1 clipped


def test_ppo_value_loss_takes_the_larger_of_clipped_and_unclipped():
    ppo = get_objective("ppo")(cliprange_value=0.2, vf_coef=1.0)
    z = torch.zeros(1, 2)
    values, old_values, ret = torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[2.0, 0.0]])
    out = ppo(_rollout(z, z, values=values, old_values=old_values, ret=ret))
    # token 1: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; token 2: 0.01 vs 0.01
    assert out.metrics["loss/value"].item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert out.loss.item() == pytest.approx(out.metrics["loss/value"].item())


def test_ppo_masks_padding_tokens():
    ppo = get_objective("ppo")()
    mask = torch.tensor([[True, True, False]])
    a = ppo(_rollout(torch.zeros(1, 3), torch.zeros(1, 3), adv=torch.tensor([[1.0, 1.0, 99.0]]),
                     mask=mask))
    assert a.metrics["loss/policy"].item() == pytest.approx(-1.0)


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.3  # V past the end = 0
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    r = token_rewards(kl * mask, torch.tensor([1.0, -1.0]), mask, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 - 1.0, 0, 0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = -0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(d * d / 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(d) - 1 - d)


def test_adaptive_kl_controller_update_rule():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=100)  # e = clip(0.5) = 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)  # e = -0.1
    assert ctl.value == pytest.approx(0.2 * 1.002 * (1 - 0.1 * 0.01))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_whitening_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().abs() < 1e-6 and w[0, 3] == 0


def test_response_is_cut_after_the_first_eos():
    eos = 7
    resp = torch.tensor([[3, 7, 5, 7], [3, 4, 5, 6], [7, 0, 0, 0]])
    mask, has_eos = completion_mask(resp, eos)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos.tolist() == [True, False, True]


# ---- rollouts: batched with padding == one prompt at a time ------------------------------------
def test_batched_generation_and_logps_equal_one_prompt_at_a_time():
    from ptlight.data.module import left_pad

    model, tok = tiny_chat_policy()
    ids = chat_prompt_ids(tok, ["Sort these words alphabetically: cat dog",
                                "Sort: zebra apple mango kiwi pear fig"])
    assert len(ids[0]) != len(ids[1])  # so the batch really is padded
    gen_kw = dict(do_sample=False, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    batch = left_pad(ids, tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(**batch, **gen_kw)
        width = batch["input_ids"].shape[1]
        full_attn = torch.cat([batch["attention_mask"], torch.ones_like(out[:, width:])], 1)
        logps, _, _ = token_scores(model, out, full_attn, width, 0.7)
        for row, single in enumerate(ids):
            one = torch.tensor([single])
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **gen_kw)
            assert alone[0, len(single):].tolist() == out[row, width:].tolist()
            lp, _, _ = token_scores(model, alone, torch.ones_like(alone), len(single), 0.7)
            torch.testing.assert_close(lp[0], logps[row], atol=1e-5, rtol=1e-5)


def test_position_ids_follow_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids(mask)[:, 2:].tolist() == [[0, 1], [2, 3]]


# ---- reward plugins -----------------------------------------------------------------------------
def test_builtin_rewards_are_entry_points_and_gold_scores_the_task():
    assert {"gold", "reward_model"} <= set(available_rewards())
    gold = build_reward({"name": "gold", "task": "sort"})
    prompt = [{"role": "user", "content": "Sort these words alphabetically: pear apple"}]
    assert gold([prompt, prompt], ["apple pear", "pear apple"]).tolist() == [1.0, 0.0]
    assert issubclass(get_reward("gold"), Reward)


def test_reward_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown reward 'nope'.*gold"):
        build_reward({"name": "nope"})
    with pytest.raises(ConfigError, match="reward.temperature.*valid keys: task"):
        build_reward({"name": "gold", "temperature": 1})
    with pytest.raises(ConfigError, match="reward_model needs path"):
        build_reward({"name": "reward_model"})
    # checked before the reward model loads (the path is never read)
    for extra, message in [({"batch_size": 0}, r"batch_size=0: write a whole number >= 1"),
                           ({"max_length": 0}, r"max_length=0: write a whole number >= 2"),
                           ({"dtype": "float64x"}, r"dtype='float64x' is not a torch dtype")]:
        with pytest.raises(ConfigError, match=r"reward 'reward_model'\): " + message):
            build_reward({"name": "reward_model", "path": "/no/such/export", **extra})


# ---- rm and ppo through the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm")
    proc = run_cli("method=rm", *TINY, f"hydra.run.dir={run_dir}", "eval.num_pairs=16",
                   "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_rm_run_logs_metrics_and_exports_a_head_next_to_the_backbone(rm_run):
    run_dir, stdout = rm_run
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens",
                "center_loss"):
        assert f"train/{key}" in header and f"val/{key}" in header
    report = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= report["heldout"]["rm/accuracy"] <= 1.0 and report["heldout"]["num_pairs"] == 16
    assert "reward model accuracy" in stdout
    assert (run_dir / "reward_model.png").stat().st_size > 0
    assert "held-out pairs" in (run_dir / "report.md").read_text()
    head = json.loads((run_dir / "export" / "reward_head.json").read_text())
    assert head["format"] == "ptlight.reward_head/1" and head["token"] == "last"


@pytest.mark.slow
def test_rm_export_scores_the_same_with_plain_transformers_and_the_plugin(rm_run, tmp_path):
    export = rm_run[0] / "export"
    prompt = [{"role": "user", "content": "Sort these words alphabetically: pear apple fig"}]
    plugin = build_reward({"name": "reward_model", "path": str(export)})
    ours = plugin([prompt, prompt], ["apple fig pear", "pear"]).tolist()
    script = f"""
import json, torch, safetensors.torch
from transformers import AutoModel, AutoTokenizer
d = {str(export)!r}
tok = AutoTokenizer.from_pretrained(d); base = AutoModel.from_pretrained(d).eval()
head = safetensors.torch.load_file(d + "/reward_head.safetensors")
prompt = {prompt!r}
out = []
for answer in ["apple fig pear", "pear"]:
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + [{{"role": "assistant", "content": answer}}], tokenize=False)
    comp = tok(full[len(p):], add_special_tokens=False).input_ids
    comp = comp[: comp.index(tok.eos_token_id) + 1]
    ids = torch.tensor([tok(p, add_special_tokens=False).input_ids + comp])
    with torch.no_grad():
        h = base(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    out.append((h[0, -1] @ head["weight"].T + head["bias"]).item())
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain == pytest.approx(ours, abs=1e-4)


@pytest.mark.slow
def test_short_ppo_run_with_the_learned_rm_logs_finite_kl_and_reward(rm_run, tmp_path):
    run_dir = tmp_path / "ppo"
    proc = run_cli("method=ppo", *TINY, f"hydra.run.dir={run_dir}", "trainer.max_steps=8",
                   "trainer.val_check_interval=1", "method.ppo.num_ppo_epochs=2",
                   "method.ppo.max_new_tokens=6", "reward=reward_model",
                   f"reward.path={rm_run[0] / 'export'}",
                   "method.ppo.adaptive_kl=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    train = [r for r in rows if r.get("train/objective/kl")]
    assert len(train) == 2  # 8 optimiser steps = 2 rollouts x 2 epochs x 2 minibatches
    for r in train:
        for key in ("objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward",
                    "policy/clipfrac", "policy/approxkl", "loss/value", "val/error",
                    "policy/entropy", "returns/mean"):
            assert math.isfinite(float(r[f"train/{key}"])), key
    assert float(train[0]["train/first_ratio"]) == pytest.approx(1.0, abs=1e-5)
    val = [r for r in rows if r.get("val/objective/scores")]
    assert val and math.isfinite(float(val[-1]["val/loss"]))
    assert (run_dir / "export" / "value_head.safetensors").is_file()
    assert (run_dir / "samples.jsonl").is_file()
    assert (run_dir / "ppo.png").stat().st_size > 0 and "ppo.png" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_ppo_refuses_bad_settings_before_loading_weights(tmp_path):
    proc = run_cli("method=ppo", *TINY, f"hydra.run.dir={tmp_path}", "method.ppo.num_mini_batches=3")
    assert proc.returncode == 2 and "method.ppo.num_mini_batches=3 must divide" in proc.stderr
    proc = run_cli("method=ppo", *TINY, f"hydra.run.dir={tmp_path}", "reward.name=nope")
    assert proc.returncode == 2 and "reward.name: unknown reward 'nope'" in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("method.ppo.max_new_tokens=0", r"method\.ppo\.max_new_tokens=0: the response length cap; "
                                    r"write a whole number >= 1"),
    ("method.ppo.num_ppo_epochs=0", r"method\.ppo\.num_ppo_epochs=0: optimisation passes"),
    ("method.ppo.gamma=2", r"method\.ppo\.gamma=2: the discount must be a finite number >= 0\.0 "
                           r"and <= 1\.0"),
    ("method.ppo.lam=-1", r"method\.ppo\.lam=-1: GAE's lambda must be"),
    ("method.ppo.kl_coef=-1", r"method\.ppo\.kl_coef=-1: the KL penalty's coefficient must be "
                              r"a finite number >= 0\.0"),
    ("method.ppo.ptx_coef=-1", r"method\.ppo\.ptx_coef=-1: the weight of the SFT loss"),
    ("method.ppo.missing_eos_penalty=-1", r"method\.ppo\.missing_eos_penalty=-1: the amount"),
    ("method.ppo.adaptive_kl=yes", r"method\.ppo\.adaptive_kl='yes': the adaptive KL "
                                   r"controller on or off; write method\.ppo\.adaptive_kl=true"),
    ("method.ppo.kl_horizon=0", r"method\.ppo\.kl_horizon=0: the adaptive KL controller's "
                                r"horizon must be a finite number > 0\.0"),
])
def test_ppo_settings_out_of_range_fail_before_weights_load(compose_cfg, tmp_path, no_weights,
                                                           override, message):
    import ptlight.train as train
    from ptlight.errors import ConfigError

    extra = ["method.ppo.adaptive_kl=true"] if "kl_horizon" in override else []
    with pytest.raises(ConfigError, match=message):
        train.train_stage(compose_cfg("method=ppo", *TINY, *extra, override), tmp_path)


# ---- pipelines --------------------------------------------------------------------------------
def test_stage_overrides_resolve_model_from_and_export_references():
    from omegaconf import OmegaConf

    from ptlight.pipeline import stage_overrides

    stage = OmegaConf.create({"name": "ppo", "method": "ppo", "model_from": "sft",
                              "overrides": ["reward.path={export:rm}"]})
    exports = {"sft": "/runs/0-sft/export", "rm": "/runs/1-rm/export"}
    ov = stage_overrides(stage, exports, "/runs/1-rm/export", ["seed=1"])
    assert ov == ["method=ppo", "reward.path=/runs/1-rm/export", "seed=1",
                  "model.path=/runs/0-sft/export"]
    plain = OmegaConf.create({"name": "dpo", "method": "dpo", "overrides": []})
    assert stage_overrides(plain, exports, "/prev", [])[-1] == "model.path=/prev"
    bad = OmegaConf.create({"name": "ppo", "method": "ppo", "overrides": ["x={export:nope}"]})
    with pytest.raises(ConfigError, match=r"\{export:nope\} names no earlier stage"):
        stage_overrides(bad, exports, None, [])


@pytest.mark.slow
def test_rlhf_experiment_chains_sft_rm_ppo_from_one_command(tmp_path):
    # command-line overrides reach every stage, so only keys all stages have
    proc = run_cli("experiment=rlhf", *TINY, f"hydra.run.dir={tmp_path}", "eval.num_pairs=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((tmp_path / "pipeline.json").read_text())
    assert [s["stage"] for s in stages] == ["sft", "rm", "ppo"]
    sft_export = str(tmp_path / "0-sft" / "export")
    rm_cfg = (tmp_path / "1-rm" / "config.yaml").read_text()
    ppo_cfg = (tmp_path / "2-ppo" / "config.yaml").read_text()
    assert f"path: {sft_export}" in rm_cfg and f"path: {sft_export}" in ppo_cfg
    assert f"path: {tmp_path / '1-rm' / 'export'}" in ppo_cfg  # the reward model
    assert "reward model accuracy" in proc.stdout and "after ppo" in proc.stdout


@pytest.mark.slow
def test_eval_scores_and_judges_win_rate_with_a_trained_reward_model(rm_run, tmp_path):
    export = rm_run[0] / "export"  # also a causal LM (its LM head is the SFT one): a generator
    proc = subprocess.run(
        [sys.executable, "-m", "ptlight.eval", f"model.path={export}", f"eval.baseline={export}",
         "eval.num_prompts=8", "eval.max_new_tokens=6", "eval.num_pairs=0",
         "eval.judge={name: reward_model, path: " + str(export) + "}",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    judge = json.loads((tmp_path / "eval.json").read_text())["judge"]
    assert judge["spec"]["name"] == "reward_model"
    assert judge["model/mean"] == pytest.approx(judge["baseline/mean"])  # same model, greedy
    assert judge["win_rate"]["tie_rate"] == 1.0
    assert "under judge 'reward_model'" in (tmp_path / "report.md").read_text()


class _Constant(Reward):
    name = "constant"

    def score(self, prompts, completions):
        return [0.5] * len(completions)


@pytest.mark.parametrize("missing_eos_penalty", [None, 0.3])
def test_rollout_scores_responses_without_eos_by_the_configured_penalty(missing_eos_penalty):
    from omegaconf import OmegaConf

    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.model.reference import FrozenCopy
    from ptlight.config import config_dir
    from ptlight.data.module import left_pad
    from ptlight.methods.ppo import PPOMethod

    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    tok = load_tokenizer(cfg)
    policy = build_policy(cfg, tok)
    method_cfg = OmegaConf.load(f"{config_dir()}/method/ppo.yaml")
    method_cfg.ppo.max_new_tokens = 4
    method_cfg.ppo.missing_eos_penalty = missing_eos_penalty
    module = PPOMethod(policy, get_objective("ppo")(), method_cfg.optim, FrozenCopy(policy),
                       _Constant(), tok, method_cfg.ppo)
    prompts = [[{"role": "user", "content": f"Sort these words alphabetically: cat {w}"}]
               for w in ("dog", "emu", "fox", "gnu")]
    ids = [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids for p in prompts]
    batch = {**left_pad(ids, tok.pad_token_id), "prompts": prompts}
    roll = module.rollout(batch)
    responses = roll["seqs"][:, batch["input_ids"].shape[1]:]
    has_eos = (responses == tok.eos_token_id).any(1)
    no_eos = 0.5 - missing_eos_penalty if missing_eos_penalty is not None else -1.0
    expected = torch.where(has_eos, torch.tensor(0.5), torch.tensor(no_eos))
    torch.testing.assert_close(roll["scores"], expected)
    assert (~has_eos).any()  # an untrained model does not stop within 4 tokens
    # the KL-free first rollout: policy == reference, so every per-token KL is 0
    assert roll["kl_seq"].abs().max() < 1e-5
    assert torch.isfinite(roll["advantages"]).all() and torch.isfinite(roll["returns"]).all()


def test_naming_another_reward_plugin_drops_the_gold_configs_task(compose_cfg, tmp_path,
                                                                  no_weights):
    """``reward.name=<plugin>`` alone: gold's ``task`` default is not a setting of that
    plugin, and was not written, so it goes (one info line); a ``reward.task`` written on the
    command line stays, and the plugin refuses it by name before any weights load."""
    from ptlight.train import drop_unwritten_reward_defaults, train_stage

    named = ["method=ppo", "reward.name=reward_model", f"+reward.path={tmp_path}"]
    cfg = drop_unwritten_reward_defaults(compose_cfg(*named), named)
    assert dict(cfg.reward) == {"name": "reward_model", "path": str(tmp_path)}
    with pytest.raises(ModelLoadError, match="reward_head.safetensors"):  # past the settings
        train_stage(compose_cfg(*named, *TINY), tmp_path / "named", [*named, *TINY])
    default = ["method=ppo"]
    assert dict(drop_unwritten_reward_defaults(compose_cfg(*default), default).reward) == {
        "name": "gold", "task": "sort"}
    written = [*named, "reward.task=sort", *TINY]
    with pytest.raises(ConfigError, match=r"has no setting\(s\) reward\.task"):
        train_stage(compose_cfg(*written), tmp_path / "run", written)


def _one_block_scores(model, ids, n_prompt, temperature):
    """The RL scoring written as one ``[B, N, V]`` block through the model's own forward."""
    logits = model(input_ids=ids).logits[:, n_prompt - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return (logp.gather(-1, ids[:, n_prompt:, None]).squeeze(-1),
            -(logp.exp() * logp).detach().sum(-1))


@pytest.mark.parametrize("chunk_rows, checkpointed", [(None, False), (5, False), (5, True)])
def test_rollout_scoring_keeps_at_most_one_vocabulary_block_for_the_backward(
        chunk_rows, checkpointed, monkeypatch):
    """PPO's and the group methods' scoring (``token_scores``) gives the log-probs with their
    graph and the entropies as a detached metric. The LM head runs in row chunks (here one of
    28 rows, or six): the backward keeps one fp32 log-softmax of the completion tokens in all
    (not also ``exp`` of it for an entropy gradient never taken), and none when the chunks
    are checkpointed (past ``HEAD_CHECKPOINT_BYTES``). Values and the gradients of every
    parameter equal the one-block computation's."""
    from ptlight.engine import logps as logps_mod

    if chunk_rows is not None:
        monkeypatch.setattr(logps_mod, "head_chunk_rows", lambda vocab, hidden: chunk_rows)
    if checkpointed:
        monkeypatch.setattr(logps_mod, "HEAD_CHECKPOINT_BYTES", 0)
    policy, _ = tiny_chat_policy()
    ids = torch.randint(5, 200, (4, 12))
    vocab = policy.get_output_embeddings().weight.shape[0]
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved: dict[int, tuple] = {}  # storage -> shape: a tensor saved twice is kept once

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logps, entropy, _ = token_scores(policy, ids, torch.ones_like(ids), 5, 0.7)
    rows_kept = sum(math.prod(shape[:-1]) for shape in saved.values() if shape[-1] == vocab)
    assert saved and rows_kept == (0 if checkpointed else 4 * 7)
    assert logps.shape == entropy.shape == (4, 7)
    assert logps.requires_grad and not entropy.requires_grad
    weights = torch.linspace(-1, 1, 28).view(4, 7)  # a loss that weighs every token apart
    grads = torch.autograd.grad((logps * weights).sum(), list(policy.parameters()))
    want, want_entropy = _one_block_scores(policy, ids, 5, 0.7)
    want_grads = torch.autograd.grad((want * weights).sum(), list(policy.parameters()))
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the rollout's scoring: chunked, no graph, the same values
        plain, _, _ = token_scores(policy, ids, torch.ones_like(ids), 5, 0.7)
    torch.testing.assert_close(plain, want.detach(), atol=1e-5, rtol=1e-5)


def _rollout_batch(tok, group: int, seed: int = 0):
    """A rollout batch as the engine returns it: three left-padded chat prompts of different
    lengths, ``group`` sampled completions each (rows of a prompt contiguous), every one cut
    after its first EOS at a different place, one never reaching it."""
    from ptlight.engine.rollout import finish

    g = torch.Generator().manual_seed(seed)
    prompts = chat_prompt_ids(tok, ["sort: b a", "sort these words: pear apple fig", "c"])
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    raw = torch.randint(5, 200, (len(prompts) * group, 9), generator=g)
    for r in range(raw.shape[0] - 1):  # the last completion runs to the length cap
        raw[r, (2 * r + 1) % 9] = tok.eos_token_id
    raw[1] = raw[0]  # two samples alike (with G > 1: one branch of the prompt's trie)
    raw[2, 0] = raw[0, 0]  # and one that starts like them
    return finish(ids, attn, raw, group, tok.eos_token_id, tok.pad_token_id, 0.0)


@pytest.mark.parametrize("group", [1, 3])
def test_rollout_scoring_packed_equals_the_padded_rows(group):
    """``token_scores(layout=rollout_layout(..., G))``, the RL methods' packed scoring (each
    prompt once with its G completions as branches, no padding), gives the padded path's
    log-probs, entropies, value predictions and parameter gradients (policy and value head)
    on every completion token up to each row's EOS, and 0 past it."""
    policy, tok = tiny_chat_policy()
    policy.train()
    gen = _rollout_batch(tok, group)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    mask = gen.completion_mask
    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape) * mask

    def run(**kw):
        policy.zero_grad(), head.zero_grad()
        lp, ent, values = token_scores(policy, gen.sequences, gen.attention_mask, gen.n_prompt,
                                       0.7, head, **kw)
        ((lp * weights).sum() + (values * weights).sum()).backward()
        grads = [p.grad.clone() for p in [*policy.parameters(), *head.parameters()]]
        return lp.detach(), ent, values.detach(), grads

    from ptlight.methods import ppo

    plain = run()
    layout = rollout_layout(gen.sequences, gen.attention_mask, gen.n_prompt, group)
    forwards = []
    with patch.object(ppo, "packed_hidden", lambda *a: forwards.append(a) or packed_hidden(*a)):
        packed = run(layout=layout)
    assert len(forwards) == 1 and forwards[0][1] is layout.packed  # the packed forward ran
    for a, b in zip(plain[:3], packed[:3]):
        torch.testing.assert_close(b * mask, a * mask, atol=1e-5, rtol=1e-5)
        assert not (b * ~mask).any()
    for a, b in zip(plain[3], packed[3]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_target_logps_chunks_match_one_block_with_a_bias_and_no_rows(checkpointed, monkeypatch):
    """:func:`target_logps` with a biased head, in uneven chunks, checkpointed or not, against
    one block: values, and the gradients of the hidden states, the weight and the bias; no
    rows gives empty results."""
    from ptlight.engine import logps as logps_mod
    from ptlight.engine.logps import target_logps

    if checkpointed:
        monkeypatch.setattr(logps_mod, "HEAD_CHECKPOINT_BYTES", 0)
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (11,))
    lp, ent = target_logps(h, t, w, b, 1.3, chunk_rows=4)
    full = torch.log_softmax((h @ w.T + b) / 1.3, -1)
    torch.testing.assert_close(lp, full.gather(-1, t[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).detach())
    got = torch.autograd.grad((lp * torch.arange(11.0)).sum(), (h, w, b))
    want = torch.autograd.grad((full.gather(-1, t[:, None]).squeeze(-1) * torch.arange(11.0)).sum(),
                               (h, w, b))
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x)
    empty_lp, empty_ent = target_logps(h[:0], t[:0], w, b)
    assert empty_lp.shape == empty_ent.shape == (0,)


def test_rl_scoring_memory_script_runs_every_variant():
    script = REPO / "scripts" / "bench_rl_scoring_memory.py"
    out = subprocess.run([sys.executable, str(script), "--vocab", "4096", "--rows", "2",
                          "--tokens", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln.strip("| ").split(" | ") for ln in out.stdout.splitlines() if ln.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["chunked", "checkpointed", "one_block", "recorded"]
    assert all(float(r[1]) >= 0 and float(r[2]) > 0 for r in rows[1:])
