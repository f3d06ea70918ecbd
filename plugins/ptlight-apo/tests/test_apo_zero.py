import math
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
from ptlight.objectives import Logps, get_objective

from ptlight_apo import APOZero


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _installed() -> bool:
    try:
        distribution("ptlight-apo")
    except PackageNotFoundError:
        return False
    return True


def test_class_attributes():
    assert (APOZero.name, APOZero.needs_reference, APOZero.data_kind) == (
        "apo_zero",
        True,
        "pairwise",
    )
    assert APOZero().beta == 0.1


def test_init_anchor_is_one():
    policy = torch.randn(4, 2)
    out = APOZero()(Logps(policy, policy.clone()))
    assert out.loss.item() == pytest.approx(1.0, abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_hand_value_and_grad():
    beta = 0.5
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.5]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.5], [-2.0, -2.0]])  # ρ = (0.5, −0.5), (−1, 0.5)
    out = APOZero(beta=beta)(Logps(policy, reference))
    expected = [1 - sigmoid(0.25) + sigmoid(-0.25), 1 - sigmoid(-0.5) + sigmoid(0.25)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["rewards/margins"].item() == pytest.approx((0.5 - 0.75) / 2)
    out.loss.backward()
    # ∂/∂S_w = −β σ'(βρ_w)/B, ∂/∂S_l = +β σ'(βρ_l)/B with σ' = σ(1 − σ)
    d = lambda x: sigmoid(x) * (1 - sigmoid(x))  # noqa: E731
    assert policy.grad[:, 0].tolist() == pytest.approx([-beta * d(0.25) / 2, -beta * d(-0.5) / 2])
    assert policy.grad[:, 1].tolist() == pytest.approx([beta * d(-0.25) / 2, beta * d(0.25) / 2])


def test_validation():
    with pytest.raises(ValueError, match="beta"):
        APOZero(beta=0)
    with pytest.raises(ValueError, match="reference"):
        APOZero()(Logps(policy=torch.zeros(1, 2)))


@pytest.mark.skipif(
    not _installed(),
    reason="ptlight-apo is not installed, so its entry point is not registered; run "
    "`pip install --no-deps --no-build-isolation plugins/ptlight-apo` first",
)
def test_entry_point_resolves_to_plugin():
    assert get_objective("apo_zero") is APOZero


@pytest.mark.skipif(not _installed(), reason="pip install --no-deps -e plugins/ptlight-apo")
@pytest.mark.slow
def test_runs_through_the_ptlight_cli(tmp_path):
    """What a user does after `pip install ptlight-apo`: train with it from the command line."""
    import json
    import os
    import subprocess
    import sys

    tiny = ["model.arch.hidden_size=64", "model.arch.intermediate_size=128",
            "model.arch.num_hidden_layers=3", "model.arch.layer_types=[conv,conv,full_attention]",
            "data.num_train=32", "data.val_size=8", "data.batch_size=8", "trainer.max_steps=2",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "eval.before=false", "eval.num_prompts=4", "eval.max_new_tokens=4"]
    proc = subprocess.run(
        [sys.executable, "-m", "ptlight", "method=dpo", "method.objective.name=apo_zero",
         "~method.objective.label_smoothing", "~method.objective.rpo_alpha",
         f"hydra.run.dir={tmp_path}", *tiny],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["objective"] == "apo_zero" and report["global_step"] == 2
    assert "train/rewards/margins" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
