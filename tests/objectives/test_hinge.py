import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.hinge import Hinge


def test_class_attributes():
    assert (Hinge.name, Hinge.needs_reference, Hinge.data_kind) == ("hinge", True, "pairwise")


def test_init_anchor_one():
    policy = torch.randn(4, 2)
    out = Hinge()(Logps(policy, policy.clone()))
    assert out.loss.item() == pytest.approx(1.0)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_grad():
    beta = 0.5
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.5], [0.0, -4.0]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.5], [-2.0, -2.0], [0.0, 0.0]])  # h = 1, −1.5, 4
    out = Hinge(beta=beta)(Logps(policy, reference))
    assert out.losses.tolist() == pytest.approx([1 - 0.5, 1 + 0.75, 0.0])
    out.loss.backward()
    # active rows: ∂/∂S_w = −β/B; the satisfied row (βh = 2 > 1) gets no gradient
    assert policy.grad[:, 0].tolist() == pytest.approx([-beta / 3, -beta / 3, 0.0])
    assert policy.grad[:, 1].tolist() == pytest.approx([beta / 3, beta / 3, 0.0])


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        Hinge(beta=0)
    with pytest.raises(ValueError, match="reference"):
        Hinge()(Logps(policy=torch.zeros(1, 2)))
