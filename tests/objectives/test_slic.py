import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.slic import SLiC


def test_class_attributes():
    assert (SLiC.name, SLiC.needs_reference, SLiC.data_kind) == ("slic", False, "pairwise")
    obj = SLiC()
    assert (obj.delta, obj.lambda_coef) == (1.0, 0.1)


def test_hand_value_and_grad():
    policy = torch.tensor([[-2.0, -2.5], [-1.0, -5.0]], requires_grad=True)
    out = SLiC(delta=1.0, lambda_coef=0.1)(Logps(policy=policy))
    # row 0: max(0, 1 + 2 − 2.5) + 0.1·2 = 0.7; row 1: max(0, 1 + 1 − 5) + 0.1·1 = 0.1
    assert out.losses.tolist() == pytest.approx([0.7, 0.1], abs=1e-6)
    assert out.metrics["calibration_loss"].item() == pytest.approx(0.25)
    assert out.metrics["nll_loss"].item() == pytest.approx(1.5)
    out.loss.backward()
    # row 0 (hinge active): ∂/∂S_w = (−1 − λ)/B, ∂/∂S_l = 1/B; row 1: only the NLL term
    assert policy.grad.tolist() == [
        pytest.approx([-1.1 / 2, 0.5]),
        pytest.approx([-0.1 / 2, 0.0]),
    ]


def test_equal_logps_gives_margin_plus_nll():
    policy = torch.tensor([[-3.0, -3.0]])
    out = SLiC(delta=2.0, lambda_coef=0.5)(Logps(policy=policy))
    assert out.loss.item() == pytest.approx(2.0 + 0.5 * 3.0)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_validation():
    with pytest.raises(ValueError, match="delta"):
        SLiC(delta=0)
    with pytest.raises(ValueError, match="lambda_coef"):
        SLiC(lambda_coef=-1)
