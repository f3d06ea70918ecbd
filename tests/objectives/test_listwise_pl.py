import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.dpo import DPO
from ptlight.objectives.listwise_pl import ListwisePL


def test_class_attributes():
    assert (ListwisePL.name, ListwisePL.needs_reference, ListwisePL.data_kind) == (
        "listwise_pl",
        True,
        "listwise",
    )


def test_k2_equals_dpo():
    policy, reference = torch.randn(6, 2) * 3, torch.randn(6, 2) * 3
    ours = ListwisePL(beta=0.4)(Logps(policy, reference))
    theirs = DPO(beta=0.4)(Logps(policy, reference))
    torch.testing.assert_close(ours.losses, theirs.losses)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(ours.metrics[key], theirs.metrics[key])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_init_anchor_log_k_factorial(k):
    policy = torch.randn(3, k)
    out = ListwisePL()(Logps(policy, policy.clone()))
    assert out.loss.item() == pytest.approx(math.log(math.factorial(k)), abs=1e-5)


def test_hand_value_k3_and_grad():
    a, b, c = 0.5, -0.2, 0.1  # β = 1, reference 0
    policy = torch.tensor([[a, b, c]], requires_grad=True)
    out = ListwisePL(beta=1.0)(Logps(policy, torch.zeros(1, 3)))
    expected = -(a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) - (
        b - math.log(math.exp(b) + math.exp(c))
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    # ∂/∂s_c = softmax(a,b,c)_c + softmax(b,c)_c (c never chosen, appears in both normalisers)
    e = [math.exp(v) for v in (a, b, c)]
    assert policy.grad[0, 2].item() == pytest.approx(e[2] / sum(e) + e[2] / (e[1] + e[2]))
    assert policy.grad[0, 0].item() == pytest.approx(-1 + e[0] / sum(e))
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)  # a>b, a>c, b<c


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        ListwisePL(beta=0)
    with pytest.raises(ValueError, match="K >= 2"):
        ListwisePL()(Logps(torch.zeros(2, 1), torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="reference"):
        ListwisePL()(Logps(torch.zeros(2, 3)))
