import math

import pytest
import torch

from ptlight.objectives.rdrop import RDrop, RDropInputs


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


LOGITS_1 = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
LOGITS_2 = [[0.0, 1.0, -1.0], [0.5, 0.0, 2.0]]
TARGETS = [0, 2]


def make(logits_1=LOGITS_1, logits_2=LOGITS_2, targets=TARGETS, index=(0, 0), batch=2):
    return RDropInputs(
        logits_1=torch.tensor(logits_1, requires_grad=True),
        logits_2=torch.tensor(logits_2, requires_grad=True),
        targets=torch.tensor(targets),
        example_index=torch.tensor(index),
        batch_size=batch,
    )


def hand_terms():
    costs, kls = [], []
    for l1, l2, y in zip(LOGITS_1, LOGITS_2, TARGETS):
        p, q = softmax(l1), softmax(l2)
        costs.append(0.5 * (-math.log(p[y]) - math.log(q[y])))
        kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        kls.append(0.5 * (kl_pq + kl_qp))
    return costs, kls


def test_class_attributes():
    assert (RDrop.name, RDrop.needs_reference, RDrop.data_kind, RDrop.passes) == (
        "rdrop",
        False,
        "sft",
        2,
    )
    assert RDrop().alpha == 0.5


def test_hand_value_metrics_and_per_example_losses():
    alpha = 0.5
    costs, kls = hand_terms()
    out = RDrop(alpha=alpha)(make(index=(0, 0), batch=2))
    assert out.loss.item() == pytest.approx(sum(costs) / 2 + alpha * sum(kls) / 2, abs=1e-6)
    m = out.metrics
    assert m["nll"].item() == pytest.approx(sum(costs) / 2, abs=1e-6)
    assert m["rdrop/kl"].item() == pytest.approx(sum(kls) / 2, abs=1e-6)
    # argmax: pass 1 → (0, 2) both right; pass 2 → (1, 2) one right
    assert m["mean_token_accuracy"].item() == pytest.approx(3 / 4)
    ent = [-sum(v * math.log(v) for v in softmax(lg)) for lg in LOGITS_1 + LOGITS_2]
    assert m["entropy"].item() == pytest.approx(sum(ent) / 4, abs=1e-6)
    assert m["num_tokens"].item() == 2.0
    # both positions in example 0; example 1 has no tokens → 0
    per_token = [c + alpha * k for c, k in zip(costs, kls)]
    assert out.losses.tolist() == pytest.approx([sum(per_token) / 2, 0.0], abs=1e-6)
    split = RDrop(alpha=alpha)(make(index=(1, 0), batch=3))
    assert split.losses.tolist() == pytest.approx([per_token[1], per_token[0], 0.0], abs=1e-6)


def test_identical_passes_give_plain_nll():
    x = make(logits_2=LOGITS_1)
    out = RDrop(alpha=1.0)(x)
    nll = [-math.log(softmax(lg)[y]) for lg, y in zip(LOGITS_1, TARGETS)]
    assert out.metrics["rdrop/kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert out.loss.item() == pytest.approx(sum(nll) / 2, abs=1e-6)


def test_gradients_flow_through_both_passes():
    x = make()
    out = RDrop(alpha=0.5)(x)
    out.loss.backward()
    assert x.logits_1.grad.abs().sum() > 0 and x.logits_2.grad.abs().sum() > 0
    # analytic gradient of c + α·k w.r.t. the pass-1 logits (α = 1)
    y = make(logits_1=[[0.0, 0.0, 0.0]], logits_2=[[1.0, 0.0, 0.0]], targets=[1], index=(0,))
    out = RDrop(alpha=1.0)(y)
    out.loss.backward()
    p, q = softmax([0.0, 0.0, 0.0]), softmax([1.0, 0.0, 0.0])
    # ∂c/∂z1 = ½(p − onehot(1)); ∂k/∂z1_v = ½[p_v(d_v − Σ p d) + (p_v − q_v)], d = log p − log q
    d = [math.log(a / b) for a, b in zip(p, q)]
    pd = sum(a * b for a, b in zip(p, d))
    grad = [0.5 * (p[v] - (v == 1)) + 0.5 * (p[v] * (d[v] - pd) + p[v] - q[v]) for v in range(3)]
    assert y.logits_1.grad[0].tolist() == pytest.approx(grad, abs=1e-6)


def test_empty_batch_and_masked_vocab_are_finite():
    empty = RDropInputs(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long), batch_size=2)
    out = RDrop()(empty)
    assert out.loss.item() == 0.0 and out.losses.tolist() == [0.0, 0.0]
    masked = make(logits_1=[[1.0, -math.inf, 0.0]] * 2, logits_2=[[0.0, -math.inf, 1.0]] * 2)
    out = RDrop()(masked)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(masked.logits_1.grad).all()


def test_validation():
    with pytest.raises(ValueError, match="alpha"):
        RDrop(alpha=-0.1)
