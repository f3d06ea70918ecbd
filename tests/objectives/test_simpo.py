import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.simpo import SimPO


def test_class_attributes():
    assert (SimPO.name, SimPO.needs_reference, SimPO.data_kind) == ("simpo", False, "pairwise")


def test_defaults_follow_trl():
    obj = SimPO()
    assert (obj.beta, obj.gamma_beta_ratio, obj.label_smoothing) == (2.0, 0.5, 0.0)


def test_equal_average_logps_gives_softplus_gamma():
    # A_w = A_l (−6/3 = −4/2): loss = −log σ(−γ) = log(1 + e^γ), γ = 0.5·2 = 1
    policy = torch.tensor([[-6.0, -4.0]])
    out = SimPO()(Logps(policy=policy, lengths=torch.tensor([[3, 2]])))
    assert out.loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_grad():
    policy = torch.tensor([[-4.0, -9.0], [-1.0, -1.0]], requires_grad=True)
    lengths = torch.tensor([[2, 3], [1, 4]])
    out = SimPO(beta=2.0, gamma_beta_ratio=0.5)(Logps(policy=policy, lengths=lengths))
    # row 0: A = (−2, −3), z = −4 + 6 − 1 = 1; row 1: A = (−1, −0.25), z = −2 + 0.5 − 1 = −2.5
    z = [1.0, -2.5]
    assert out.losses.tolist() == pytest.approx([math.log(1 + math.exp(-v)) for v in z], abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx((-4.0 + -2.0) / 2)
    assert out.metrics["rewards/rejected"].item() == pytest.approx((-6.0 + -0.5) / 2)
    out.loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # ∂/∂S_w = −β σ(−z)/|y_w| / B
    assert policy.grad[:, 0].tolist() == pytest.approx(
        [-2.0 * sig(-1.0) / 2 / 2, -2.0 * sig(2.5) / 1 / 2], abs=1e-6
    )


def test_label_smoothing():
    policy = torch.tensor([[-4.0, -9.0]])
    out = SimPO(label_smoothing=0.1)(Logps(policy=policy, lengths=torch.tensor([[2, 3]])))
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        SimPO(beta=0)
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        SimPO(gamma_beta_ratio=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        SimPO(label_smoothing=0.5)
    with pytest.raises(ValueError, match="lengths"):
        SimPO()(Logps(policy=torch.zeros(1, 2)))
