import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.orpo import ORPO


def log_odds(a: float) -> float:
    return a - math.log(1 - math.exp(a))


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_class_attributes():
    assert (ORPO.name, ORPO.needs_reference, ORPO.data_kind) == ("orpo", False, "pairwise")
    assert ORPO().beta == 0.1


def test_equal_average_logps_gives_nll_plus_lambda_ln2():
    policy = torch.tensor([[-2.0, -3.0]])  # A = −1 for both
    x = Logps(policy=policy, lengths=torch.tensor([[2, 3]]), chosen_nll=torch.tensor([1.0]))
    out = ORPO(beta=0.25)(x)
    assert out.loss.item() == pytest.approx(1.0 + 0.25 * math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_metrics_and_grad():
    lam = 0.1
    policy = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    nll = torch.tensor([0.7], requires_grad=True)
    x = Logps(policy=policy, lengths=torch.tensor([[2, 2]]), chosen_nll=nll)
    out = ORPO(beta=lam)(x)
    diff = log_odds(-0.5) - log_odds(-1.5)
    assert out.loss.item() == pytest.approx(0.7 - lam * log_sigmoid(diff), abs=1e-6)
    m = out.metrics
    assert m["nll_loss"].item() == pytest.approx(0.7)
    assert m["log_odds_ratio"].item() == pytest.approx(log_sigmoid(diff), abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(diff, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(lam * -0.5)
    assert m["rewards/rejected"].item() == pytest.approx(lam * -1.5)
    assert m["rewards/accuracies"].item() == 1.0
    out.loss.backward()
    assert nll.grad.item() == pytest.approx(1.0)
    # ∂o/∂A = 1/(1 − e^A); ∂/∂S_w = −λ σ(−diff) · o'(A_w) / |y_w|
    sig_neg = 1 / (1 + math.exp(diff))
    expected = -lam * sig_neg / (1 - math.exp(-0.5)) / 2
    assert policy.grad[0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_nll_defaults_to_mean_completion_nll():
    policy = torch.tensor([[-1.0, -3.0]])
    out = ORPO()(Logps(policy=policy, lengths=torch.tensor([[2, 2]])))
    diff = log_odds(-0.5) - log_odds(-1.5)
    assert out.loss.item() == pytest.approx(0.5 - 0.1 * log_sigmoid(diff), abs=1e-6)


def test_zero_logp_is_clamped_and_finite():
    policy = torch.tensor([[0.0, -1e-9]], requires_grad=True)
    out = ORPO()(Logps(policy=policy, lengths=torch.tensor([[3, 3]])))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        ORPO(beta=-0.1)
    with pytest.raises(ValueError, match="lengths"):
        ORPO()(Logps(policy=torch.zeros(1, 2)))
