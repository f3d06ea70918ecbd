import math

import pytest
import torch

from ptlight.objectives import Logps
from ptlight.objectives.dpo import DPO
from ptlight.objectives.rank_debiased import RankDebiased
from ptlight.objectives.rdpo import RDPO

LN2 = math.log(2)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_class_attributes():
    assert (RankDebiased.name, RankDebiased.needs_reference, RankDebiased.data_kind) == (
        "rank_debiased",
        True,
        "listwise",
    )


def test_k2_equals_dpo_exactly():
    torch.manual_seed(0)
    policy, reference = torch.randn(6, 2) * 5, torch.randn(6, 2) * 5
    ours = RankDebiased(beta=0.3)(Logps(policy, reference))
    theirs = DPO(beta=0.3)(Logps(policy, reference))
    assert torch.equal(ours.losses, theirs.losses)
    assert torch.equal(ours.loss, theirs.loss)
    # same with graded scores that order the pair the same way, and with uniform weights
    scores = torch.tensor([[5.0, 1.0]]).expand(6, 2)
    ours = RankDebiased(beta=0.3, weighting="uniform")(Logps(policy, reference, scores=scores))
    assert torch.equal(ours.losses, theirs.losses)


def test_k2_label_smoothing_equals_dpo_label_smoothing():
    policy, reference = torch.randn(4, 2), torch.randn(4, 2)
    ours = RankDebiased(label_smoothing=0.2)(Logps(policy, reference))
    theirs = DPO(label_smoothing=0.2)(Logps(policy, reference))
    torch.testing.assert_close(ours.losses, theirs.losses)


def test_k2_normalize_none_is_lipo_constant_times_dpo():
    # ψ = (1, 0): G = (1, 0); τ is {1, 2} in either order
    w = abs((2**1 - 1) - (2**0 - 1)) * abs(1 / math.log2(2) - 1 / math.log2(3))
    assert w == pytest.approx(0.36907, abs=1e-5)
    policy, reference = torch.randn(5, 2), torch.randn(5, 2)
    ours = RankDebiased(normalize="none")(Logps(policy, reference))
    theirs = DPO()(Logps(policy, reference))
    torch.testing.assert_close(ours.losses, w * theirs.losses)


@pytest.mark.parametrize("weighting", ["lambda", "uniform"])
@pytest.mark.parametrize("with_scores", [False, True])
def test_all_zero_s_gives_ln2(weighting, with_scores):
    policy = torch.randn(3, 5)
    scores = torch.tensor([[3.0, 3.0, 2.0, 1.0, 0.0]] * 3) if with_scores else None
    out = RankDebiased(weighting=weighting)(Logps(policy, policy.clone(), scores=scores))
    assert out.loss.item() == pytest.approx(LN2, abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 0.0
    assert out.metrics["rank/kendall_tau"].item() == 0.0


@pytest.mark.parametrize("normalize", ["prompt", "none"])
def test_permuting_items_leaves_loss_unchanged(normalize):
    torch.manual_seed(1)
    policy, reference = torch.randn(4, 6), torch.randn(4, 6)
    scores = torch.tensor([[4.0, 2.0, 2.0, 1.0, 0.0, 2.0]] * 4)  # ties included
    lengths = torch.randint(1, 20, (4, 6))
    obj = RankDebiased(beta=0.7, normalize=normalize, length_alpha=0.05)
    base = obj(Logps(policy, reference, lengths=lengths, scores=scores))
    for seed in range(5):
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        out = obj(Logps(policy[:, perm], reference[:, perm], lengths=lengths[:, perm],
                        scores=scores[:, perm]))
        torch.testing.assert_close(out.losses, base.losses)
        for key in ("rank/ndcg", "rank/kendall_tau", "rewards/margins", "rewards/accuracies"):
            torch.testing.assert_close(out.metrics[key], base.metrics[key])


def test_ties_hand_value_and_detached_weights():
    # scores (2, 2, 0) → ψ = (1, 1, 0), P = {(0, 2), (1, 2)}; s = ρ (β = 1) = (0.3, −0.2, 0.1)
    # sort s descending: item 0, item 2, item 1 → τ = (1, 3, 2)
    policy = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    x = Logps(policy, torch.zeros(1, 3), scores=torch.tensor([[2.0, 2.0, 0.0]]))
    out = RankDebiased(beta=1.0)(x)
    inv_d = [1 / math.log2(1 + 1), 1 / math.log2(1 + 3), 1 / math.log2(1 + 2)]
    w02 = 1 * abs(inv_d[0] - inv_d[2])
    w12 = 1 * abs(inv_d[1] - inv_d[2])
    total = w02 + w12
    expected = (w02 * softplus(-(0.3 - 0.1)) + w12 * softplus(-(-0.2 - 0.1))) / total
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["rank/valid_pairs"].item() == 2.0
    out.loss.backward()
    # weights are constants: ∂ℓ/∂s_0 = −w02 σ(−(s0 − s2)) / W, ∂ℓ/∂s_1 = −w12 σ(−(s1 − s2)) / W
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    g0, g1 = -w02 * sig(-0.2) / total, -w12 * sig(0.3) / total
    assert policy.grad[0].tolist() == pytest.approx([g0, g1, -(g0 + g1)], abs=1e-6)


def test_uniform_and_unnormalised_hand_values_from_ranks():
    # no scores: ψ = (1, 0.5, 0); s = (0.1, 0.3, −0.2), all three pairs in P
    x = Logps(torch.tensor([[0.1, 0.3, -0.2]]), torch.zeros(1, 3))
    diffs = [0.1 - 0.3, 0.1 + 0.2, 0.3 + 0.2]
    uniform = RankDebiased(beta=1.0, weighting="uniform")(x)
    assert uniform.loss.item() == pytest.approx(sum(softplus(-d) for d in diffs) / 3, abs=1e-6)
    # τ = (2, 1, 3), G = (1, √2 − 1, 0)
    g = [1.0, math.sqrt(2) - 1, 0.0]
    inv_d = [1 / math.log2(3), 1 / math.log2(2), 1 / math.log2(4)]
    w = [abs(g[i] - g[j]) * abs(inv_d[i] - inv_d[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    lipo = RankDebiased(beta=1.0, normalize="none")(x)
    assert lipo.loss.item() == pytest.approx(
        sum(wi * softplus(-d) for wi, d in zip(w, diffs)), abs=1e-6
    )


def test_metrics_hand_values():
    x = Logps(torch.tensor([[0.1, 0.3, -0.2]]), torch.zeros(1, 3))
    m = RankDebiased(beta=1.0)(x).metrics
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.2)
    assert m["rewards/margins"].item() == pytest.approx((-0.2 + 0.3 + 0.5) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert m["rank/kendall_tau"].item() == pytest.approx((2 - 1) / 3)
    g1 = math.sqrt(2) - 1
    dcg = 1 / math.log2(3) + g1 / math.log2(2)
    idcg = 1 / math.log2(2) + g1 / math.log2(3)
    assert m["rank/ndcg"].item() == pytest.approx(dcg / idcg, abs=1e-6)
    assert m["logps/top"].item() == pytest.approx(0.1)
    assert m["logps/bottom"].item() == pytest.approx(-0.2)
    assert m["rank/valid_pairs"].item() == 3.0 and m["rank/valid_prompts"].item() == 1.0
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_all_tied_prompt_is_skipped_and_not_counted():
    policy, reference = torch.randn(2, 3), torch.randn(2, 3)
    scores = torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    out = RankDebiased()(Logps(policy, reference, scores=scores))
    alone = RankDebiased()(Logps(policy[1:], reference[1:], scores=scores[1:]))
    assert out.losses[0].item() == 0.0
    torch.testing.assert_close(out.loss, alone.loss)
    assert out.metrics["rank/valid_prompts"].item() == 1.0


def test_all_skipped_batch_gives_zero_with_grad_path():
    policy = torch.randn(2, 4, requires_grad=True)
    x = Logps(policy, torch.randn(2, 4), scores=torch.full((2, 4), 7.0))
    out = RankDebiased()(x)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(policy.grad, torch.zeros_like(policy))
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_length_alpha_at_k2_equals_rdpo():
    policy, reference = torch.randn(4, 2), torch.randn(4, 2)
    lengths = torch.randint(1, 40, (4, 2))
    ours = RankDebiased(beta=0.1, length_alpha=0.02)(Logps(policy, reference, lengths))
    theirs = RDPO(beta=0.1, alpha=0.02)(Logps(policy, reference, lengths))
    torch.testing.assert_close(ours.losses, theirs.losses)


def test_validation():
    bad = [
        ({"beta": 0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"weighting": "ndcg"}, "weighting"),
        ({"normalize": "batch"}, "normalize"),
    ]
    for kwargs, key in bad:
        with pytest.raises(ValueError, match=key):
            RankDebiased(**kwargs)
    with pytest.raises(ValueError, match="K >= 2"):
        RankDebiased()(Logps(torch.zeros(2, 1), torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="lengths"):
        RankDebiased(length_alpha=0.1)(Logps(torch.zeros(1, 2), torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="reference"):
        RankDebiased()(Logps(torch.zeros(1, 2)))
