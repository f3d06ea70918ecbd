"""SparsePO and TDPO against hand-derived numbers and the reductions of OBJECTIVES.md §9.

The hand example: one pair, a 5-word vocabulary, 3 completion tokens — the chosen y_w has two
(targets 0 and 1), the rejected y_l one (target 2). The reference is uniform (p = 0.2) at
every position; the policy puts p = (.6, .1, .1, .1, .1) at y_w's first position, uniform at
its second, and (.4, .15, .15, .15, .15) at y_l's position. The LM head is the identity, so the
"hidden states" handed to the reducer are the logits themselves (log p).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ptlight.engine.token_terms import ReferenceSide, reduce_chunks
from ptlight.objectives.dpo import DPO
from ptlight.objectives.base import Logps
from ptlight.objectives.sparsepo import SparsePO, activation_mask, masked_margin
from ptlight.objectives.tdpo import TDPO
from ptlight.objectives.tokens import TokenTerms

L = math.log
POLICY = [[.6, .1, .1, .1, .1], [.2] * 5, [.4, .15, .15, .15, .15]]
TARGETS = [0, 1, 2]
# by hand: q_t = log p_θ(y_t) − log 0.2; k_t = Σ_v 0.2·(log 0.2 − log p_θ(v))
Q = [L(3), 0.0, L(.75)]
K = [0.2 * (-L(3) + 4 * L(2)), 0.0, 0.2 * (-L(2) + 4 * L(4 / 3))]
BETA = 0.1


def hand_terms(hidden=None, ref_hidden=None, requires_grad=False) -> TokenTerms:
    """The example's TokenTerms, computed by the chunked reducer (chunk_size 2: two chunks)."""
    h = torch.tensor(POLICY).log().requires_grad_(requires_grad)
    cols = reduce_chunks(h, torch.tensor(TARGETS), torch.eye(5), None,
                         ReferenceSide(torch.zeros(3, 5), torch.eye(5), None), chunk_size=2)
    return TokenTerms(logps=cols["logp"], rows=torch.tensor([0, 0, 1]),
                      mask=torch.tensor([[True, True], [True, False]]), k=2,
                      ref_logps=cols["ref_logp"], ref_kl=cols["ref_kl"],
                      hidden=hidden, ref_hidden=ref_hidden)


def test_reducer_gives_the_hand_derived_terms():
    t = hand_terms()
    assert t.logps.tolist() == pytest.approx([L(.6), L(.2), L(.15)], abs=1e-6)
    assert t.ref_logps.tolist() == pytest.approx([L(.2)] * 3, abs=1e-6)
    assert t.ref_kl.tolist() == pytest.approx(K, abs=1e-6)


def test_masked_loss_hand_derived_value():
    m_u, m_d = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([0.5, 1.0, 1.0])
    u, delta, _ = masked_margin(hand_terms(), m_u, m_d, BETA)
    want_u = BETA * ((Q[0] + Q[1]) - 0.5 * Q[2])
    want_delta = BETA * (K[2] - 0.5 * K[0])
    assert u.item() == pytest.approx(want_u, abs=1e-6)
    assert delta.item() == pytest.approx(want_delta, abs=1e-6)
    loss = F.softplus(-(u - delta)).item()
    assert loss == pytest.approx(math.log1p(math.exp(-(want_u - want_delta))), abs=1e-6)


def test_mask_up_one_down_zero_is_dpo():
    t = hand_terms()
    u, delta, _ = masked_margin(t, torch.ones(3), torch.zeros(3), BETA)
    policy = t.columns(t.logps)
    reference = t.columns(t.ref_logps)
    dpo = DPO(beta=BETA)(Logps(policy=policy, reference=reference))
    assert F.softplus(-(u - delta)).item() == pytest.approx(dpo.loss.item(), abs=1e-6)
    assert dpo.loss.item() == pytest.approx(math.log1p(math.exp(-BETA * (Q[0] + Q[1] - Q[2]))),
                                            abs=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_learnable_masks_start_at_ones_so_sparsepo_starts_as_tdpo1(shared):
    """Through the whole objective: w = 0, b = 1 gives m^u ≡ m^d ≡ 1, i.e. TDPO1."""
    obj = SparsePO(beta=BETA, mask="learnable", shared_masks=shared)
    obj.bind_hidden_size(4)
    t = hand_terms(hidden=torch.randn(3, 4))
    out = obj(t)
    tdpo1 = TDPO(beta=BETA, variant=1)(t)
    want = math.log1p(math.exp(-BETA * ((Q[0] + Q[1] - Q[2]) - (K[2] - K[0] - K[1]))))
    assert out.loss.item() == pytest.approx(tdpo1.loss.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert out.metrics["mask/mean"].item() == pytest.approx(1.0)
    assert out.metrics["mask/sparsity_chosen"].item() == 0.0
    assert out.metrics["kl/chosen"].item() == pytest.approx(K[0] + K[1], abs=1e-6)
    assert out.metrics["kl/rejected"].item() == pytest.approx(K[2], abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(BETA * (Q[0] + Q[1]), abs=1e-6)


def test_learnable_mask_is_relu_of_a_linear_layer_and_gets_gradients():
    obj = SparsePO(beta=BETA, mask="learnable", shared_masks=False)
    obj.bind_hidden_size(2)
    with torch.no_grad():
        obj.mask_u.weight.copy_(torch.tensor([[1.0, 0.0]]))
        obj.mask_u.bias.zero_()
    h = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]])
    m_u, m_d = obj.masks(hand_terms(hidden=h))
    assert m_u.tolist() == [2.0, 0.0, 0.5]  # ReLU(h·w + b)
    assert m_d.tolist() == [1.0, 1.0, 1.0]  # its own layer, still at its start
    out = obj(hand_terms(hidden=h, requires_grad=True))
    assert out.metrics["mask/sparsity_chosen"].item() == pytest.approx(0.25)  # 1 zero of 4
    out.loss.backward()
    assert obj.mask_u.weight.grad.abs().sum() > 0 and obj.mask_d.bias.grad.abs().sum() > 0


def test_activation_mask_is_the_row_max_normalised_relu_of_mean_activation():
    ref_hidden = torch.tensor([[2.0, 2.0], [1.0, 0.0], [-3.0, 1.0]])  # means 2, 0.5, −1
    m = activation_mask(hand_terms(ref_hidden=ref_hidden))
    assert m.tolist() == [1.0, 0.25, 0.0]  # chosen row: /2; rejected row: ReLU(−1) = 0
    out = SparsePO(beta=BETA, mask="activation")(hand_terms(ref_hidden=ref_hidden))
    want_u = BETA * (Q[0] + 0.25 * Q[1])
    want_delta = BETA * (0.0 - (K[0] + 0.25 * K[1]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-(want_u - want_delta))),
                                            abs=1e-6)
    assert out.metrics["mask/sparsity_rejected"].item() == 1.0


def test_tdpo2_hand_derived_value():
    out = TDPO(beta=BETA, alpha=0.5, variant=2)(hand_terms())
    want = math.log1p(math.exp(-BETA * ((Q[0] + Q[1] - Q[2]) - 0.5 * (K[2] - K[0] - K[1]))))
    assert out.loss.item() == pytest.approx(want, abs=1e-6)


def test_tdpo2_gradient_matches_hand_stop_gradient():
    def grad_of(fn):
        h = torch.tensor(POLICY).log().requires_grad_(True)
        cols = reduce_chunks(h, torch.tensor(TARGETS), torch.eye(5), None,
                             ReferenceSide(torch.zeros(3, 5), torch.eye(5), None), 2)
        fn(cols).backward()
        return h.grad

    def objective(cols, variant):
        t = TokenTerms(logps=cols["logp"], rows=torch.tensor([0, 0, 1]),
                       mask=torch.tensor([[True, True], [True, False]]), k=2,
                       ref_logps=cols["ref_logp"], ref_kl=cols["ref_kl"])
        return TDPO(beta=BETA, alpha=0.5, variant=variant)(t).loss

    def by_hand(cols):
        kl, lp = cols["ref_kl"], cols["logp"] - cols["ref_logp"]
        return F.softplus(-BETA * ((lp[0] + lp[1] - lp[2])
                                   - 0.5 * (kl[2] - (kl[0] + kl[1]).detach())))

    tdpo2 = grad_of(lambda c: objective(c, 2))
    assert torch.allclose(tdpo2, grad_of(by_hand), atol=1e-7)
    assert not torch.allclose(tdpo2, grad_of(lambda c: objective(c, 1)), atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0), "beta must be > 0"),
    (dict(mask="random"), "mask='random'"),
    (dict(mask="activation", shared_masks=False), "shared_masks=false needs mask=learnable"),
])
def test_sparsepo_refuses_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsePO(**kwargs)


def test_tdpo_refuses_bad_variant_and_missing_terms():
    with pytest.raises(ValueError, match="variant=3"):
        TDPO(variant=3)
    t = hand_terms()
    t.ref_kl = None
    with pytest.raises(ValueError, match="TokenTerms.ref_kl is None"):
        TDPO()(t)
    with pytest.raises(RuntimeError, match="bind_hidden_size"):
        SparsePO()(hand_terms(hidden=torch.zeros(3, 4)))
