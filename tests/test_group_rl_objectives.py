"""The critic-free RL objectives (grpo, rloo, reinforce_pp, online_dpo) against TRL 1.16 and
the anchors of docs/objectives.md (group RL).

TRL equivalence is checked by running TRL's own code on our tensors:
- losses: ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss``, called unbound with a
  stand-in ``self`` that returns our log-probs from ``_get_per_token_logps_and_entropies``
  (one process, no accumulation, no vLLM, entropy and off-policy masks off);
- advantages: TRL computes them inline in ``_generate_and_score_completions`` (generation,
  reward calls and advantages in one 450-line method), so the test cuts the advantage lines out
  of that method's source (between the marker lines below) and executes exactly them on our
  rewards. A TRL upgrade that moves the markers fails the test loudly.

Not compared with a reference implementation: reinforce_pp (OpenRLHF is not a dependency; a
hand-computed example instead) and online_dpo (TRL's ``OnlineDPOTrainer`` computes its loss
inside ``training_step`` together with generation; checked against ptlight's dpo instead).
"""

from __future__ import annotations

import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo
import trl.trainer.rloo_trainer as trl_rloo
from omegaconf import OmegaConf

from ptlight.errors import ConfigError
from ptlight.model.reference import reference_mode
from ptlight.objectives import GroupRollout, Logps
from ptlight.objectives.dpo import DPO
from ptlight.objectives.grpo import GRPO
from ptlight.objectives.online_dpo import OnlineDPO
from ptlight.objectives.reinforce_pp import ReinforcePP
from ptlight.objectives.rloo import RLOO

NAN = float("nan")


# ---- TRL harness ------------------------------------------------------------------------------
class _OneProcess:
    """``accelerator`` of a single process: reductions and gathers are the identity."""

    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_self(logps: torch.Tensor, **attrs) -> SimpleNamespace:
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, model=SimpleNamespace(training=True), accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list)}, **attrs)


def _trl_inputs(mask: torch.Tensor, **extra) -> dict:
    b, t = mask.shape
    return {"prompt_ids": torch.zeros(b, 1, dtype=torch.long),
            "prompt_mask": torch.ones(b, 1, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long),
            "completion_mask": mask.long(), **extra}


def _trl_lines(function, first: str, last: str) -> str:
    """The source lines of ``function`` from the line containing ``first`` through the line
    containing ``last``, dedented."""
    lines = inspect.getsource(function).splitlines()
    i = next(k for k, line in enumerate(lines) if first in line)
    j = next(k for k, line in enumerate(lines) if k >= i and last in line)
    return textwrap.dedent("\n".join(lines[i:j + 1]))


ADV_FIRST = "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)"
ADV_LAST = "advantages = torch.nan_to_num(advantages, nan=0.0)"


def trl_grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str):
    """TRL 1.16 GRPO's advantage lines on one reward function of weight 1."""
    code = _trl_lines(trl_grpo.GRPOTrainer._generate_and_score_completions, ADV_FIRST, ADV_LAST)
    ns = dict(vars(trl_grpo))
    ns.update(rewards_per_func=rewards.unsqueeze(1).clone(), device="cpu",
              num_generations=group_size,
              self=SimpleNamespace(multi_objective_aggregation="sum_then_normalize",
                                   reward_weights=torch.ones(1), scale_rewards=scale_rewards))
    exec(code, ns)
    return ns["advantages"], ns["is_std_zero"]


def trl_rloo_advantages(rewards, group_size, beta, normalize, old=None, ref=None, mask=None):
    """TRL 1.16 RLOO's advantage lines (KL penalty included) on one reward function."""
    code = _trl_lines(trl_rloo.RLOOTrainer._generate_and_score_completions, ADV_FIRST, ADV_LAST)
    ns = dict(vars(trl_rloo))
    ns.update(rewards_per_func=rewards.unsqueeze(1).clone(), device="cpu",
              num_generations=group_size, old_per_token_logps=old, ref_per_token_logps=ref,
              completion_mask=None if mask is None else mask.long(), gather=lambda x: x,
              self=SimpleNamespace(reward_weights=torch.ones(1), reward_clip_range=None,
                                   beta=beta, normalize_advantages=normalize))
    exec(code, ns)
    return ns["advantages"]


def random_rollout(seed: int, b: int = 6, t: int = 5, perturb: bool = False):
    """Log-probs, mask (row 2 empty, others of different lengths), advantages, old and reference
    log-probs. ``perturb``: old log-probs differ from the current ones (μ > 1 minibatches)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 0, 1, 4, 2][:b])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logps = -torch.rand(b, t, generator=g) * 3 * mask
    adv = torch.randn(b, generator=g)
    old = logps + (0.4 * torch.randn(b, t, generator=g) * mask if perturb else 0.0)
    ref = (logps + 0.3 * torch.randn(b, t, generator=g)) * mask
    return logps, mask, adv, old, ref


# ---- grpo vs TRL ------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mu_one", [True, False])
def test_grpo_loss_equals_trl_compute_loss(loss_type, level, beta, mu_one):
    logps, mask, adv, old, ref = random_rollout(seed=7, perturb=not mu_one)
    eps, eps_high, max_len, n_items = 0.2, 0.28, 8, float(mask.sum()) + 11.0

    trl_logps = logps.clone().requires_grad_(True)
    stub = _trl_self(
        trl_logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    extra = {"advantages": adv, "num_items_in_batch": torch.tensor(n_items)}
    if not mu_one:
        extra["old_per_token_logps"] = old
    if beta:
        extra["ref_per_token_logps"] = ref
    trl_loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, _trl_inputs(mask, **extra))
    trl_loss.backward()

    ours_logps = logps.clone().requires_grad_(True)
    objective = GRPO(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                     epsilon=eps, epsilon_high=eps_high)
    out = objective(GroupRollout(
        logps=ours_logps, mask=mask, group_size=3, advantages=adv,
        old_logps=None if mu_one else old, ref_logps=ref if beta else None,
        max_completion_length=max_len, num_items_in_batch=n_items))
    out.loss.backward()

    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-5)
    trl_metrics = stub._metrics["train"]
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    names += ["kl"] if beta else []
    for name in names:
        assert out.metrics[name].item() == pytest.approx(trl_metrics[name][0], abs=1e-6), name
    if not beta:
        assert "kl" not in out.metrics
    if not mu_one:  # the perturbation is large enough for the clip to fire
        assert trl_metrics["clip_ratio/region_mean"][0] > 0


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl(scale_rewards):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(16, generator=g)
    rewards[1] = NAN  # unscorable, group 0
    rewards[8:12] = 1.0  # group 2: all equal
    rewards[13:16] = NAN  # group 3: one scorable completion
    ours, metrics = GRPO(scale_rewards=scale_rewards).advantages(rewards, 4)
    theirs, is_std_zero = trl_grpo_advantages(rewards, 4, scale_rewards)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert metrics["reward"].item() == pytest.approx(torch.nanmean(rewards).item())
    assert metrics["reward_std"].item() == pytest.approx(trl_grpo.nanstd(rewards).item())
    if scale_rewards != "batch":  # TRL then reports the batch std's zero test instead
        assert metrics["frac_reward_zero_std"].item() == pytest.approx(
            is_std_zero.float().mean().item())
    assert metrics["frac_reward_zero_std"].item() == pytest.approx(0.25)


def test_grpo_scale_rewards_accepts_trl_booleans():
    assert GRPO(scale_rewards=True).scale_rewards == "group"
    assert GRPO(scale_rewards=False).scale_rewards == "none"


# ---- §12 anchors ------------------------------------------------------------------------------
def test_grpo_loss_at_mu_one_is_minus_mean_advantage():
    b, t = 4, 3
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    logps = (-torch.rand(b, t) * mask).requires_grad_(True)
    adv = torch.tensor([0.5, -1.0, 2.0, -0.25])
    out = GRPO(loss_type="grpo")(GroupRollout(logps=logps, mask=mask, group_size=2,
                                              advantages=adv))
    assert out.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    out.loss.backward()
    # d/dℓ_t of −A·exp(ℓ − stopgrad ℓ) at ratio 1 is −A, averaged over |y| and B
    expected = -adv[:, None] / mask.sum(1, keepdim=True) / b * mask
    torch.testing.assert_close(logps.grad, expected)
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage(scale_rewards):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.9])
    adv, metrics = GRPO(scale_rewards=scale_rewards).advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3:].abs().min() > 0.1
    assert metrics["frac_reward_zero_std"].item() == 0.5


def test_grpo_group_advantage_by_hand_with_nan():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0])  # scorable: mean 3, std 2
    adv, metrics = GRPO().advantages(rewards, 4)
    expected = torch.tensor([-2 / (2 + 1e-4), 0.0, 0.0, 2 / (2 + 1e-4)])
    torch.testing.assert_close(adv, expected)
    assert metrics["reward"].item() == pytest.approx(3.0)
    assert metrics["reward_std"].item() == pytest.approx(2.0)
    none, _ = GRPO(scale_rewards="none").advantages(rewards, 4)
    torch.testing.assert_close(none, torch.tensor([-2.0, 0.0, 0.0, 2.0]))


def test_group_size_one_with_group_scaling_is_refused():
    with pytest.raises(ValueError, match="group_size >= 2.*scale_rewards=none"):
        GRPO().advantages(torch.tensor([1.0, 2.0]), 1)
    adv, _ = GRPO(scale_rewards="none").advantages(torch.tensor([1.0, 2.0]), 1)
    assert torch.equal(adv, torch.zeros(2))
    for objective in (RLOO(beta=0.0), ReinforcePP(beta=0.0)):
        with pytest.raises(ValueError, match="group_size >= 2"):
            objective.advantages(torch.tensor([1.0, 2.0]), 1, mask=torch.ones(2, 1, dtype=bool))
    with pytest.raises(ValueError, match="group_size=3"):
        GRPO().advantages(torch.tensor([1.0, 2.0]), 3)


@pytest.mark.parametrize(("key", "value"), [("loss_type", "cispo"), ("scale_rewards", "std"),
                                            ("importance_sampling_level", "chunk")])
def test_grpo_invalid_choice_names_key_and_valid_values(key, value):
    with pytest.raises(ValueError, match=rf"grpo: {key} must be one of .*; got '{value}'"):
        GRPO(**{key: value})


def test_needs_reference_follows_beta_on_the_instance():
    """The pipeline reads ``needs_reference`` from the built objective
    (ptlight.train._check_method -> reference_mode), so beta decides whether a reference loads."""
    assert not GRPO().needs_reference and GRPO(beta=0.04).needs_reference
    assert RLOO().needs_reference and not RLOO(beta=0.0).needs_reference
    assert ReinforcePP().needs_reference and not ReinforcePP(beta=0.0).needs_reference
    assert OnlineDPO().needs_reference
    model = OmegaConf.create({})
    assert reference_mode(OmegaConf.create({"reference": "none"}), model, GRPO()) == "none"
    assert reference_mode(OmegaConf.create({"reference": "copy"}), model, GRPO()) == "none"
    assert reference_mode(OmegaConf.create({"reference": "copy"}), model,
                          GRPO(beta=0.04)) == "copy"
    with pytest.raises(ConfigError, match="needs a reference"):
        reference_mode(OmegaConf.create({"reference": "none"}), model, GRPO(beta=0.04))


# ---- rloo -------------------------------------------------------------------------------------
def test_rloo_two_completions_give_plus_minus_difference():
    adv, _ = RLOO(beta=0.0).advantages(torch.tensor([3.0, 1.0, 0.5, 2.5]), 2)
    torch.testing.assert_close(adv, torch.tensor([2.0, -2.0, -2.0, 2.0]))


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(beta, normalize):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(12, generator=g)
    rewards[2] = NAN
    rewards[9:12] = NAN  # group 2: one scorable completion
    _, mask, _, old, ref = random_rollout(seed=2, b=6)
    mask, old, ref = mask.repeat(2, 1), old.repeat(2, 1), ref.repeat(2, 1)
    ours, metrics = RLOO(beta=beta, normalize_advantages=normalize).advantages(
        rewards, 4, mask=mask, logps=old, ref_logps=ref)
    theirs = trl_rloo_advantages(rewards, 4, beta, normalize, old, ref, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours[2] == 0 and ours[11] == 0
    if beta:
        expected_kl = ((old - ref) * mask).sum() / mask.sum()
        assert metrics["kl"].item() == pytest.approx(expected_kl.item(), abs=1e-6)


@pytest.mark.parametrize("mu_one", [True, False])
def test_rloo_loss_equals_trl_compute_loss(mu_one):
    logps, mask, adv, old, _ = random_rollout(seed=11, perturb=not mu_one)
    old_seq = (old * mask).sum(1)
    trl_logps = logps.clone().requires_grad_(True)
    stub = _trl_self(trl_logps, epsilon_low=0.2, epsilon_high=0.28)
    trl_loss = trl_rloo.RLOOTrainer._compute_loss(
        stub, None, _trl_inputs(mask, old_logps=old_seq, advantages=adv))
    trl_loss.backward()

    ours_logps = logps.clone().requires_grad_(True)
    out = RLOO(epsilon_high=0.28)(GroupRollout(
        logps=ours_logps, mask=mask, group_size=2, advantages=adv,
        old_logps=None if mu_one else old))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-5)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert out.metrics[name].item() == pytest.approx(stub._metrics["train"][name][0]), name
    if not mu_one:
        assert stub._metrics["train"]["clip_ratio/region_mean"][0] > 0


# ---- reinforce_pp -----------------------------------------------------------------------------
def _pp_example():
    # one prompt, two completions: 3 tokens and 2 tokens
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]])
    ref = old - torch.tensor([[0.1, 0.2, -0.1], [0.3, 0.0, 0.0]])  # k1 = old − ref
    return torch.tensor([1.0, 0.0]), mask, old, ref


def test_reinforce_pp_hand_example_with_kl():
    rewards, mask, old, ref = _pp_example()
    adv, metrics = ReinforcePP(beta=0.5).advantages(rewards, 2, mask=mask, logps=old,
                                                    ref_logps=ref)
    # a = (0.5, −0.5); r_t = −0.5·k1 + [last]·a
    #   row 0: (−0.05, −0.10, 0.05 + 0.5) -> returns (0.40, 0.45, 0.55)
    #   row 1: (−0.15, 0 − 0.5)            -> returns (−0.65, −0.50)
    # mean 0.05; deviations (0.35, 0.40, 0.50, −0.70, −0.55); unbiased var 1.325 / 4
    std = math.sqrt(1.325 / 4)
    expected = torch.tensor([[0.35, 0.40, 0.50], [-0.70, -0.55, 0.0]]) / (std + 1e-8)
    torch.testing.assert_close(adv, expected)
    assert metrics["kl"].item() == pytest.approx(0.5 / 5)


def test_reinforce_pp_without_kl_gives_one_advantage_per_completion():
    rewards, mask, _, _ = _pp_example()
    adv, _ = ReinforcePP(beta=0.0).advantages(rewards, 2, mask=mask)
    # token values (0.5, 0.5, 0.5, −0.5, −0.5): mean 0.1, unbiased var (3·0.16 + 2·0.36) / 4
    std = math.sqrt(1.2 / 4)
    torch.testing.assert_close(adv, torch.tensor([0.4, -0.6]) / (std + 1e-8))


def test_reinforce_pp_unscorable_completion_is_left_out():
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv, _ = ReinforcePP(beta=0.0).advantages(torch.tensor([2.0, 0.0, NAN, 1.0]), 4, mask=mask)
    # scorable: group mean 1 -> (1, −1, 0) on 2 tokens each: mean 0, unbiased std sqrt(4/5)
    std = math.sqrt(4 / 5)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]) / (std + 1e-8))


def test_reinforce_pp_loss_is_token_mean_surrogate():
    rewards, mask, old, ref = _pp_example()
    objective = ReinforcePP(beta=0.5)
    adv, _ = objective.advantages(rewards, 2, mask=mask, logps=old, ref_logps=ref)
    logps = old.clone().requires_grad_(True)
    out = objective(GroupRollout(logps=logps, mask=mask, group_size=2, advantages=adv))
    assert out.loss.item() == pytest.approx(-(adv * mask).sum().item() / 5, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, -adv * mask / 5)


# ---- online_dpo -------------------------------------------------------------------------------
def _pairs():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]] * 4, dtype=torch.bool)
    logps = -torch.rand(8, 3, generator=g) * mask
    ref = -torch.rand(8, 3, generator=g) * mask
    # pairs: second wins, first wins, tie, NaN
    rewards = torch.tensor([0.2, 0.7, 1.0, 0.0, 0.5, 0.5, NAN, 1.0])
    return logps, ref, mask, rewards


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_online_dpo_equals_dpo_on_judged_pairs_and_skips_ties(beta):
    logps, ref, mask, rewards = _pairs()
    pol = logps.clone().requires_grad_(True)
    out = OnlineDPO(beta=beta)(GroupRollout(logps=pol, mask=mask, group_size=2,
                                            rewards=rewards, ref_logps=ref))
    s, s_ref = (logps * mask).sum(1), (ref * mask).sum(1)
    # chosen first: pair 0 -> (1, 0), pair 1 -> (2, 3)
    dpo = DPO(beta=beta)(Logps(policy=torch.stack([s[[1, 2]], s[[0, 3]]], 1),
                               reference=torch.stack([s_ref[[1, 2]], s_ref[[0, 3]]], 1)))
    assert out.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-6)
    torch.testing.assert_close(out.losses[:2], dpo.losses)
    assert torch.equal(out.losses[2:], torch.zeros(2))
    assert out.metrics["skipped_pairs"].item() == 2
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out.metrics[name].item() == pytest.approx(dpo.metrics[name].item(), abs=1e-6)
    out.loss.backward()
    assert torch.equal(pol.grad[4:], torch.zeros(4, 3))  # tied and NaN pairs get no gradient


def test_online_dpo_all_tied_gives_connected_zero_and_ipo_by_hand():
    logps, ref, mask, _ = _pairs()
    pol = logps.clone().requires_grad_(True)
    tied = torch.tensor([1.0, 1.0] * 4)
    out = OnlineDPO()(GroupRollout(logps=pol, mask=mask, group_size=2, rewards=tied,
                                   ref_logps=ref))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(pol.grad, torch.zeros_like(pol))
    assert out.metrics == {"skipped_pairs": torch.tensor(4.0)}

    rewards = torch.tensor([0.0, 1.0] + [1.0, 1.0] * 3)
    out = OnlineDPO(beta=0.5, loss_type="ipo")(GroupRollout(
        logps=logps, mask=mask, group_size=2, rewards=rewards, ref_logps=ref))
    s, s_ref = (logps * mask).sum(1), (ref * mask).sum(1)
    h = (s[1] - s_ref[1]) - (s[0] - s_ref[0])
    assert out.loss.item() == pytest.approx(((h - 1.0) ** 2).item(), abs=1e-6)


def test_online_dpo_needs_pairs():
    logps, ref, mask, rewards = _pairs()
    with pytest.raises(ValueError, match="group_size=2"):
        OnlineDPO()(GroupRollout(logps=logps, mask=mask, group_size=4, rewards=rewards,
                                 ref_logps=ref))


# ---- registration (entry points of the installed distribution) --------------------------------
@pytest.mark.parametrize(("name", "cls"), [("grpo", GRPO), ("rloo", RLOO),
                                           ("reinforce_pp", ReinforcePP),
                                           ("online_dpo", OnlineDPO)])
def test_group_objectives_are_registered(name, cls):
    from ptlight.objectives import build_objective, get_objective

    assert get_objective(name) is cls
    assert build_objective(name, {}).data_kind == "group"


def test_online_dpo_reports_the_reward_metrics_and_needs_pairs():
    from ptlight.objectives.online_dpo import OnlineDPO

    adv, metrics = OnlineDPO().advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    assert adv is None
    assert metrics["reward"].item() == pytest.approx(0.5)
    assert metrics["frac_reward_zero_std"].item() == pytest.approx(0.5)  # the tied pair
    with pytest.raises(ValueError, match="exactly 2 completions"):
        OnlineDPO().advantages(torch.zeros(6), 3)


# ---- advantages over every rank's generation batch (DDP / FSDP) ---------------------------
def _rank_batches(seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Two ranks' rollouts (2 prompts x G=4 each) of different completion widths: rewards
    (one unscorable), masks, rollout and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for width in (5, 8):
        rewards = torch.rand(8, generator=g)
        if width == 8:
            rewards[3] = float("nan")
        lengths = torch.randint(1, width + 1, (8,), generator=g)
        mask = torch.arange(width)[None] < lengths[:, None]
        logps = -torch.rand(8, width, generator=g) * mask
        ref = -torch.rand(8, width, generator=g) * mask
        out.append((rewards, mask, logps, ref))
    return out


def _gathered_on_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from ptlight.methods.group import all_gather, gathered_advantages, rollout_stats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        rewards, mask, logps, ref = _rank_batches()[rank]
        got = {}
        for key, objective in _BATCH_WIDE.items():
            adv, metrics = gathered_advantages(objective, rewards, 4, mask, logps, ref,
                                               all_gather=all_gather, rank=rank)
            got[key] = (adv, metrics["reward"])
        every = lambda x: all_gather(x).flatten(0, 1)  # noqa: E731
        got["stats"] = rollout_stats(metrics, mask, _has_eos(mask), rewards,
                                     _parts(rewards), every)
        results[rank] = got
        dist.barrier()  # no rank tears its group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _has_eos(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1) % 2 == 0  # any fixed rule: which completions ended


def _parts(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a": rewards, "b": torch.nan_to_num(rewards * 2 - 1, nan=0.25)}


def _rank_batch_stats(batch):
    rewards, mask = batch[0], batch[1]
    return mask, _has_eos(mask), rewards, _parts(rewards)


_BATCH_WIDE = {  # the advantages that span the batch, and one per group
    "grpo_batch": GRPO(scale_rewards="batch"), "grpo_group": GRPO(),
    "reinforce_pp_kl": ReinforcePP(beta=0.05), "reinforce_pp": ReinforcePP(beta=0.0),
    "rloo_kl": RLOO(beta=0.05),
}


def test_advantages_under_ddp_are_those_of_the_whole_gathered_batch():
    """Two gloo processes, each with its own rollouts of its own width: each gets its rows of
    the advantages one process computes over both batches (as TRL gathers rewards before
    computing them), so batch scaling and REINFORCE++'s whitening see every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # no fork of this multi-threaded worker
    mp.spawn(_gathered_on_rank, args=(2, port, results), nprocs=2, join=True)
    batches = _rank_batches()
    width = max(b[1].shape[1] for b in batches)
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], 1)  # noqa: E731
    rewards = torch.cat([b[0] for b in batches])
    mask, logps, ref = (torch.cat([pad(b[i]) for b in batches]) for i in (1, 2, 3))
    for key, objective in _BATCH_WIDE.items():
        want, metrics = objective.advantages(rewards, 4, mask=mask, logps=logps, ref_logps=ref)
        for rank, (_, m, _, _) in enumerate(batches):
            adv, reward = results[rank][key]
            rows = want[rank * 8 : (rank + 1) * 8]
            torch.testing.assert_close(adv, rows[:, : m.shape[1]] if rows.dim() == 2 else rows)
            torch.testing.assert_close(reward, metrics["reward"])
    # the logged statistics of each rank describe both ranks' rollouts
    from ptlight.methods.group import rollout_stats

    stats = rollout_stats(metrics, mask, _has_eos(mask), rewards, _parts(rewards))
    for rank in (0, 1):
        got = results[rank]["stats"]
        assert got.keys() == stats.keys()
        for key, value in stats.items():
            torch.testing.assert_close(got[key], value, equal_nan=True, msg=key)
    local = rollout_stats(metrics, *(_rank_batch_stats(batches[0])))
    assert local["rewards/b/mean"] != stats["rewards/b/mean"]
    # what the gather changes: rank 0 alone would scale by its own batch's std
    alone, _ = _BATCH_WIDE["grpo_batch"].advantages(batches[0][0], 4)
    assert not torch.allclose(alone, results[0]["grpo_batch"][0])
