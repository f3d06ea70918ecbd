import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptlight.objectives import Logps
from ptlight.objectives import kto as kto_module
from ptlight.objectives.kto import KTO


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make(policy, reference, labels, kl_policy, kl_reference, requires_grad=False):
    return Logps(
        policy=torch.tensor(policy, requires_grad=requires_grad),
        reference=torch.tensor(reference),
        labels=torch.tensor(labels),
        kl_policy=torch.tensor(kl_policy, requires_grad=requires_grad),
        kl_reference=torch.tensor(kl_reference),
    )


def hand_example():
    # ρ = (1, −0.5, 0.5); mismatched log-ratios (0.6, 0.2, 0.1) → z₀ = 0.3
    return make(
        [[-1.0], [-2.0], [-3.0]],
        [[-2.0], [-1.5], [-3.5]],
        [True, False, True],
        [-5.0, -6.0, -7.0],
        [-5.6, -6.2, -7.1],
        requires_grad=True,
    )


def test_class_attributes():
    assert (KTO.name, KTO.needs_reference, KTO.data_kind) == ("kto", True, "unpaired")


def test_init_anchor_half_lambda():
    policy = torch.randn(4, 1)
    kl = torch.randn(4)
    x = Logps(policy, policy.clone(), labels=torch.tensor([True, False, True, False]),
              kl_policy=kl, kl_reference=kl.clone())
    out = KTO(desirable_weight=1.5, undesirable_weight=1.5)(x)
    assert out.loss.item() == pytest.approx(0.5 * 1.5, abs=1e-6)
    assert out.metrics["kl"].item() == 0.0


def test_hand_value_metrics_and_grad():
    beta, w_d, w_u = 0.5, 2.0, 1.5
    x = hand_example()
    out = KTO(beta=beta, desirable_weight=w_d, undesirable_weight=w_u)(x)
    z0 = 0.3
    expected = [
        w_d * (1 - sigmoid(beta * (1.0 - z0))),
        w_u * (1 - sigmoid(beta * (z0 - -0.5))),
        w_d * (1 - sigmoid(beta * (0.5 - z0))),
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    m = out.metrics
    assert m["kl"].item() == pytest.approx(z0, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (1.0 + 0.5) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(beta * -0.5)
    assert m["rewards/margins"].item() == pytest.approx(beta * 0.75 - beta * -0.5)
    assert m["logps/chosen"].item() == pytest.approx(-2.0)
    assert m["logps/rejected"].item() == pytest.approx(-2.0)
    assert (m["count/chosen"].item(), m["count/rejected"].item()) == (2.0, 1.0)
    out.loss.backward()
    # z₀ is detached: no gradient reaches the mismatched log-probs
    assert x.kl_policy.grad is None
    # ∂/∂S (desirable) = −λ_D β σ'(β(r − z₀)) / B
    d = sigmoid(beta * 0.7) * (1 - sigmoid(beta * 0.7))
    assert x.policy.grad[0, 0].item() == pytest.approx(-w_d * beta * d / 3, abs=1e-6)
    u = sigmoid(beta * 0.8) * (1 - sigmoid(beta * 0.8))
    # undesirable: ∂/∂S = +λ_U β σ'(β(z₀ − r)) / B (raising its likelihood raises the loss)
    assert x.policy.grad[1, 0].item() == pytest.approx(w_u * beta * u / 3, abs=1e-6)


def test_negative_kl_estimate_is_clamped_to_zero():
    x = make([[-1.0], [-1.0]], [[-1.0], [-1.0]], [True, False], [-3.0, -3.0], [-2.0, -2.0])
    out = KTO()(x)
    assert out.metrics["kl"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.5)


@pytest.mark.parametrize("label", [True, False])
def test_single_class_batch_is_finite(label):
    x = make([[-1.0], [-2.0]], [[-1.5], [-1.0]], [label, label], [-3.0, -4.0], [-3.2, -4.1],
             requires_grad=True)
    out = KTO()(x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.policy.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    absent = "rejected" if label else "chosen"
    assert out.metrics[f"count/{absent}"].item() == 0.0
    assert out.metrics[f"rewards/{absent}"].item() == 0.0
    assert out.metrics["rewards/margins"].item() == 0.0


def test_reference_point_uses_global_sum_and_count(monkeypatch):
    """With distributed initialised, z₀ is Σ/N over all ranks (not a mean of per-rank means)."""
    other_rank = torch.tensor([3.0, 1.0])  # one item with log-ratio 3 on the other rank

    def fake_all_reduce(tensor):
        tensor += other_rank

    monkeypatch.setattr(kto_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(kto_module.dist, "all_reduce", fake_all_reduce)
    z0 = kto_module.reference_point(torch.tensor([0.0, 0.0, 0.0]), torch.zeros(3))
    assert z0.item() == pytest.approx(3.0 / 4)


def _two_rank_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = torch.tensor([0.0, 0.0, 0.0]) if rank == 0 else torch.tensor([3.0])
        results[rank] = kto_module.reference_point(local, torch.zeros_like(local)).item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reference_point_all_reduce_gloo(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == pytest.approx(0.75) and results[1] == pytest.approx(0.75)


def test_validation():
    for kwargs, key in [({"beta": 0}, "beta"), ({"desirable_weight": 0}, "desirable_weight"),
                        ({"undesirable_weight": -1}, "undesirable_weight")]:
        with pytest.raises(ValueError, match=key):
            KTO(**kwargs)
    x = hand_example()
    with pytest.raises(ValueError, match="kl_policy"):
        KTO()(Logps(x.policy, x.reference, labels=x.labels))
    with pytest.raises(ValueError, match="labels"):
        KTO()(Logps(x.policy, x.reference, kl_policy=x.kl_policy, kl_reference=x.kl_reference))
