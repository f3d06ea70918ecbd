import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.bco_pair import BCOPair


def test_class_attributes():
    assert (BCOPair.name, BCOPair.needs_reference, BCOPair.data_kind) == (
        "bco_pair",
        True,
        "pairwise",
    )


def test_init_anchor_two_ln2():
    policy = torch.randn(3, 2)
    out = BCOPair()(Logps(policy, policy.clone()))
    assert out.loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_grad():
    beta = 0.5
    policy = torch.tensor([[-1.0, -2.0], [-2.0, -1.0]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.5], [-1.0, -3.0]])  # ρ = (0.5, −0.5), (−1, 2)
    out = BCOPair(beta=beta)(Logps(policy, reference))
    sp = lambda x: math.log(1 + math.exp(x))  # noqa: E731
    expected = [sp(-0.25) + sp(-0.25), sp(0.5) + sp(1.0)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["rewards/margins"].item() == pytest.approx((0.5 + -1.5) / 2)
    out.loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # ∂/∂S_w = −β σ(−βρ_w)/B, ∂/∂S_l = β σ(βρ_l)/B: independent terms
    assert policy.grad[:, 0].tolist() == pytest.approx(
        [-beta * sig(-0.25) / 2, -beta * sig(0.5) / 2], abs=1e-6
    )
    assert policy.grad[:, 1].tolist() == pytest.approx(
        [beta * sig(-0.25) / 2, beta * sig(1.0) / 2], abs=1e-6
    )


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        BCOPair(beta=0)
    with pytest.raises(ValueError, match="reference"):
        BCOPair()(Logps(policy=torch.zeros(1, 2)))
