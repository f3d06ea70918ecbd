import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.cdpo import CDPO
from ptlight.objectives.dpo import DPO

POLICY = [[-1.0, -2.0], [-3.0, -1.5]]
REFERENCE = [[-1.5, -1.5], [-2.0, -2.0]]  # h = 1.0 and -1.5


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_class_attributes():
    assert (CDPO.name, CDPO.needs_reference, CDPO.data_kind) == ("cdpo", True, "pairwise")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_init_anchor_ln2(eps):
    policy = torch.randn(4, 2)
    out = CDPO(label_smoothing=eps)(Logps(policy=policy, reference=policy.clone()))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_metrics():
    beta, eps = 0.5, 0.2
    policy = torch.tensor(POLICY, requires_grad=True)
    out = CDPO(beta=beta, label_smoothing=eps)(Logps(policy, torch.tensor(REFERENCE)))
    expected = [
        -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in (1.0, -1.5)
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(beta * (0.5 - 1.0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(beta * (-0.5 + 0.5) / 2)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["logps/chosen"].item() == pytest.approx(-2.0)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())
    out.loss.backward()
    # d/dS_w of −(1−ε)log σ(βh) − ε log σ(−βh) = −β[(1−ε)σ(−βh) − εσ(βh)], over B = 2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    grad_w = [-beta * ((1 - eps) * sig(-beta * h) - eps * sig(beta * h)) / 2 for h in (1.0, -1.5)]
    assert policy.grad[:, 0].tolist() == pytest.approx(grad_w, abs=1e-6)
    assert policy.grad[:, 1].tolist() == pytest.approx([-g for g in grad_w], abs=1e-6)


def test_equals_dpo_with_same_label_smoothing():
    policy, reference = torch.randn(5, 2), torch.randn(5, 2)
    ours = CDPO(beta=0.2, label_smoothing=0.15)(Logps(policy, reference))
    theirs = DPO(beta=0.2, label_smoothing=0.15)(Logps(policy, reference))
    torch.testing.assert_close(ours.losses, theirs.losses)


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        CDPO(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        CDPO(label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        CDPO()(Logps(policy=torch.zeros(1, 2)))
