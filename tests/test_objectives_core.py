"""DPO and SFT objectives against hand-derived values."""

import math

import pytest
import torch

from ptlight.objectives import Logps, TokenLogps, get_objective


def test_dpo_is_ln2_when_policy_equals_reference():
    dpo = get_objective("dpo")(beta=0.1)
    logps = torch.tensor([[-5.0, -7.0], [-3.0, -2.0]])
    out = dpo(Logps(policy=logps, reference=logps.clone()))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["rewards/accuracies"].item() == 0.0
    assert out.metrics["rewards/margins"].item() == 0.0


def test_dpo_hand_computed():
    dpo = get_objective("dpo")(beta=0.5)
    policy = torch.tensor([[-4.0, -6.0], [-3.0, -1.0]], requires_grad=True)
    reference = torch.tensor([[-5.0, -5.0], [-2.0, -2.0]])
    out = dpo(Logps(policy=policy, reference=reference))
    # pair 0: h = (-4+5) - (-6+5) = 2 ; pair 1: h = (-3+2) - (-1+2) = -2
    expected = [math.log(1 + math.exp(-0.5 * 2)), math.log(1 + math.exp(0.5 * 2))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx((0.5 * 1 + 0.5 * -1) / 2)
    assert out.metrics["rewards/accuracies"].item() == 0.5
    out.loss.backward()
    # d/dS_w of softplus(-βh)/2 = -β σ(-βh) / 2
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert policy.grad[0, 0].item() == pytest.approx(-0.5 * sig(-1.0) / 2, abs=1e-6)
    assert policy.grad[0, 1].item() == pytest.approx(0.5 * sig(-1.0) / 2, abs=1e-6)


def test_dpo_label_smoothing_is_cdpo():
    dpo = get_objective("dpo")(beta=1.0, label_smoothing=0.2)
    out = dpo(Logps(policy=torch.tensor([[0.0, -1.0]]), reference=torch.zeros(1, 2)))
    expected = 0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_rejects_bad_hyperparameters_and_missing_reference():
    with pytest.raises(ValueError, match="beta"):
        get_objective("dpo")(beta=0.0)
    with pytest.raises(ValueError, match="reference"):
        get_objective("dpo")()(Logps(policy=torch.zeros(1, 2)))


def test_sft_token_and_sequence_reduction():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tok = get_objective("sft")()(TokenLogps(logps=logps, mask=mask))
    assert tok.loss.item() == pytest.approx((1 + 2 + 4) / 3)
    seq = get_objective("sft")(reduction="sequence")(TokenLogps(logps=logps, mask=mask))
    assert seq.loss.item() == pytest.approx((1.5 + 4.0) / 2)
    assert tok.losses.tolist() == pytest.approx([1.5, 4.0])


def test_sft_all_masked_batch_is_zero_not_nan():
    out = get_objective("sft")()(TokenLogps(logps=torch.zeros(2, 3), mask=torch.zeros(2, 3).bool()))
    assert out.loss.item() == 0.0


def test_sft_label_smoothing_and_dft():
    logps = torch.tensor([[math.log(0.5)]])
    mask = torch.ones(1, 1).bool()
    mean_logp = torch.tensor([[-3.0]])
    out = get_objective("sft")(label_smoothing=0.1)(TokenLogps(logps, mask, mean_logp))
    assert out.loss.item() == pytest.approx(0.9 * math.log(2) + 0.1 * 3.0, abs=1e-6)
    dft = get_objective("sft")(loss_type="dft")(TokenLogps(logps, mask))
    assert dft.loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-6)
