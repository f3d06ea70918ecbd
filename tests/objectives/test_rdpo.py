import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.dpo import DPO
from ptlight.objectives.rdpo import RDPO


def test_class_attributes():
    assert (RDPO.name, RDPO.needs_reference, RDPO.data_kind) == ("rdpo", True, "pairwise")


def test_init_anchor_ln2_equal_lengths():
    policy = torch.randn(3, 2)
    lengths = torch.tensor([[5, 5], [2, 2], [9, 9]])
    out = RDPO(alpha=0.05)(Logps(policy, policy.clone(), lengths))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_grad():
    beta, alpha = 0.1, 0.01
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.5]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.5], [-2.0, -2.0]])  # h = 1.0, −1.5
    lengths = torch.tensor([[30, 10], [4, 24]])  # Δ|y| = 20, −20
    out = RDPO(beta=beta, alpha=alpha)(Logps(policy, reference, lengths))
    z = [beta * 1.0 + alpha * 20, beta * -1.5 + alpha * -20]
    assert out.losses.tolist() == pytest.approx([math.log(1 + math.exp(-v)) for v in z], abs=1e-6)
    out.loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert policy.grad[:, 0].tolist() == pytest.approx([-beta * sig(-v) / 2 for v in z], abs=1e-6)


def test_alpha_zero_is_dpo():
    policy, reference = torch.randn(4, 2), torch.randn(4, 2)
    lengths = torch.randint(1, 50, (4, 2))
    ours = RDPO(beta=0.2, alpha=0.0)(Logps(policy, reference, lengths))
    theirs = DPO(beta=0.2)(Logps(policy, reference))
    torch.testing.assert_close(ours.losses, theirs.losses)


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        RDPO(beta=0)
    with pytest.raises(ValueError, match="alpha"):
        RDPO(alpha=-0.1)
    with pytest.raises(ValueError, match="lengths"):
        RDPO()(Logps(policy=torch.zeros(1, 2), reference=torch.zeros(1, 2)))
