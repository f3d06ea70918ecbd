import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.robust import Robust


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_class_attributes():
    assert (Robust.name, Robust.needs_reference, Robust.data_kind) == ("robust", True, "pairwise")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_init_anchor_ln2(eps):
    policy = torch.randn(3, 2)
    out = Robust(label_smoothing=eps)(Logps(policy=policy, reference=policy.clone()))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value():
    beta, eps = 0.5, 0.2
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.5]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.5], [-2.0, -2.0]])  # h = 1.0, -1.5
    out = Robust(beta=beta, label_smoothing=eps)(Logps(policy, reference))
    expected = [
        ((1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)) / (1 - 2 * eps)
        for h in (1.0, -1.5)
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    assert policy.grad.abs().sum() > 0


def test_negative_loss_not_clamped():
    policy = torch.tensor([[0.0, -100.0]])  # β·h = 10
    out = Robust(beta=0.1, label_smoothing=0.2)(Logps(policy, torch.zeros(1, 2)))
    expected = (0.8 * softplus(-10.0) - 0.2 * softplus(10.0)) / 0.6
    assert expected < 0
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        Robust(beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Robust(label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        Robust()(Logps(policy=torch.zeros(1, 2)))
