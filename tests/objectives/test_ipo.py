import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.ipo import IPO


def test_class_attributes():
    assert (IPO.name, IPO.needs_reference, IPO.data_kind) == ("ipo", True, "pairwise")


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_init_anchor(tau, length_normalize):
    policy = torch.randn(3, 2)
    lengths = torch.tensor([[3, 5], [1, 2], [7, 7]])
    out = IPO(beta=tau, length_normalize=length_normalize)(Logps(policy, policy.clone(), lengths))
    assert out.loss.item() == pytest.approx(1 / (4 * tau**2), rel=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def inputs(requires_grad=False):
    policy = torch.tensor([[-4.0, -9.0], [-2.0, -2.0]], requires_grad=requires_grad)
    reference = torch.tensor([[-6.0, -6.0], [-3.0, -1.0]])
    lengths = torch.tensor([[2, 3], [4, 1]])
    return Logps(policy, reference, lengths)


def test_hand_value_length_normalized_with_grad():
    # row 0: ρ = (2, −3), |y| = (2, 3) → h̄ = 1 − (−1) = 2; row 1: ρ = (1, −1), |y| = (4, 1) → 1.25
    tau = 0.5  # target 1/(2τ) = 1
    x = inputs(requires_grad=True)
    out = IPO(beta=tau)(x)
    assert out.losses.tolist() == pytest.approx([(2 - 1) ** 2, (1.25 - 1) ** 2], abs=1e-6)
    out.loss.backward()
    # ∂/∂S_w = 2(h̄ − 1)/|y_w| / B, ∂/∂S_l = −2(h̄ − 1)/|y_l| / B
    expected = [[2 * 1 / 2 / 2, -2 * 1 / 3 / 2], [2 * 0.25 / 4 / 2, -2 * 0.25 / 1 / 2]]
    assert x.policy.grad.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert x.policy.grad.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    # rewards are β·ρ̄ (the length-normalised log-ratio the loss acts on)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(tau * (1.0 + 0.25) / 2)


def test_hand_value_paper_form():
    out = IPO(beta=0.5, length_normalize=False)(inputs())
    # h = 2 − (−3) = 5 and 1 − (−1) = 2; target 1
    assert out.losses.tolist() == pytest.approx([16.0, 1.0], abs=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        IPO(beta=0)
    with pytest.raises(ValueError, match="length_normalize"):
        IPO()(Logps(policy=torch.zeros(1, 2), reference=torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="reference"):
        IPO()(Logps(policy=torch.zeros(1, 2), lengths=torch.ones(1, 2)))
