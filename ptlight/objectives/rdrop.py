"""SFT with R-Drop: consistency between two dropout passes (Liang et al. 2021, arXiv 2106.14448).

    c_t = ½·(−log P¹_t(y_t) − log P²_t(y_t))
    k_t = ½·[KL(P¹_t‖P²_t) + KL(P²_t‖P¹_t)] = ½·Σ_v (P¹_t(v) − P²_t(v))·(log P¹_t(v) − log P²_t(v))
    L   = tokmean(c) + α·tokmean(k)

tokmean divides by the number of completion positions N in the batch (clamped at 1; an empty
batch gives 0). Gradients flow through both passes (no stop-gradient on either side of the KL).
The paper minimises NLL¹ + NLL² + α_paper·k; halving it gives this form, so α_here = α_paper/2.
There is no LLM default for α (the paper tunes it per task); 0.5 is a starting point, sweep
{0.1, 0.5, 1}. R-Drop needs dropout p > 0 in the model: the method must enforce it (this pure
objective cannot see the model); ``rdrop/kl`` ≈ 0 in the logs means dropout is off.

``losses`` are per-example token means of c + α·k (0 for an example with no completion tokens).
Metrics: ``nll`` (tokmean c), ``rdrop/kl`` (tokmean k), ``mean_token_accuracy`` and ``entropy``
(token means, averaged over the two passes), ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptlight.objectives.base import Objective, ObjectiveOutput


@dataclass
class RDropInputs:
    """Logits of two dropout passes at the N completion positions of a batch.

    logits_1, logits_2: ``[N, V]`` logits (cast to fp32 here) of pass 1 and pass 2.
    targets:            ``[N]`` long, the target token at each position.
    example_index:      ``[N]`` long, the batch row each position belongs to.
    batch_size:         number of examples B (rows with no position get loss 0).
    """

    logits_1: torch.Tensor
    logits_2: torch.Tensor
    targets: torch.Tensor
    example_index: torch.Tensor
    batch_size: int


class RDrop(Objective):
    """Token NLL averaged over two dropout passes plus α × their symmetric KL."""

    name = "rdrop"
    needs_reference = False
    data_kind = "sft"
    passes = 2

    def __init__(self, *, alpha: float = 0.5) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"rdrop: alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def forward(self, inputs: RDropInputs) -> ObjectiveOutput:
        # clamp: a masked (−inf) logit would otherwise give 0·(−inf) = NaN in the KL and entropy
        floor = torch.finfo(torch.float32).min
        logp_1 = torch.log_softmax(inputs.logits_1.float(), dim=-1).clamp(min=floor)  # (N, V)
        logp_2 = torch.log_softmax(inputs.logits_2.float(), dim=-1).clamp(min=floor)
        targets = inputs.targets.long()[:, None]  # (N, 1)
        cost = -0.5 * (logp_1.gather(1, targets) + logp_2.gather(1, targets))[:, 0]  # (N,) c_t
        kl = 0.5 * ((logp_1.exp() - logp_2.exp()) * (logp_1 - logp_2)).sum(dim=-1)  # (N,) k_t
        n_tok = cost.new_full((), float(cost.shape[0]))  # a fill on the device, not a copy
        per_token = cost + self.alpha * kl
        loss = per_token.sum() / n_tok.clamp(min=1)

        index = inputs.example_index.long()
        totals = per_token.new_zeros(inputs.batch_size).index_add(0, index, per_token)
        counts = per_token.new_zeros(inputs.batch_size).index_add(
            0, index, torch.ones_like(per_token)
        )
        losses = totals / counts.clamp(min=1)  # (B,) per-example token mean

        with torch.no_grad():
            hits = sum((lp.argmax(dim=-1) == inputs.targets).float() for lp in (logp_1, logp_2))
            entropy = sum(-(lp.exp() * lp).sum(dim=-1) for lp in (logp_1, logp_2))
            metrics = {
                "nll": cost.detach().sum() / n_tok.clamp(min=1),
                "rdrop/kl": kl.detach().sum() / n_tok.clamp(min=1),
                "mean_token_accuracy": hits.sum() / (2 * n_tok.clamp(min=1)),
                "entropy": entropy.sum() / (2 * n_tok.clamp(min=1)),
                "num_tokens": n_tok,
            }
        return ObjectiveOutput(loss=loss, losses=losses, metrics=metrics)
