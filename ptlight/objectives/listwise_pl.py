"""Plackett–Luce listwise DPO (DPO App. A.3, arXiv 2305.18290; LiPO's "ListMLE" baseline,
arXiv 2402.01878). Ablation of ``rank_debiased``.

    s_k = β·(S_θ(y_k) − S_ref(y_k))
    L   = −Σ_{k<K} [ s_{π(k)} − log Σ_{j≥k} exp s_{π(j)} ]

π is the strict order of the columns of ``Logps.policy`` (best first, as the ``Logps`` contract
says). ``Logps.scores`` is not used: Plackett–Luce needs a strict order and has no notion of
ties, so tied or graded data belongs to ``rank_debiased``. The per-prompt loss is a sum over the
K − 1 choice stages (not normalised by K), as in the DPO appendix; at K = 2 it reduces to
−log σ(s_1 − s_2), i.e. ``dpo``.

Metrics: ``rewards/chosen`` / ``rewards/rejected`` and ``logps/chosen`` / ``logps/rejected`` are
the first (best) and last (worst) column; ``rewards/margins`` and ``rewards/accuracies`` are the
mean of s_i − s_j and the fraction with s_i > s_j over all pairs i < j.
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput


class ListwisePL(Objective):
    """Plackett–Luce negative log-likelihood of the given order (``Logps.policy`` ``[B, K]``)."""

    name = "listwise_pl"
    needs_reference = True
    data_kind = "listwise"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"listwise_pl: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("listwise_pl needs reference log-probs (Logps.reference is None)")
        if inputs.policy.dim() != 2 or inputs.policy.shape[1] < 2:
            raise ValueError(
                f"listwise_pl expects Logps.policy [B, K] with K >= 2, got "
                f"{tuple(inputs.policy.shape)}"
            )
        s = self.beta * (inputs.policy.float() - inputs.reference.float())  # (B, K)
        suffix_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # (B, K) log Σ_{j≥k} e^{s_j}
        losses = -(s[:, :-1] - suffix_lse[:, :-1]).sum(dim=1)  # (B,); last stage is 0
        sd = s.detach()
        k = s.shape[1]
        i, j = torch.triu_indices(k, k, offset=1, device=s.device)  # every pair i < j
        sdiff = sd[:, i] - sd[:, j]  # (B, K(K−1)/2)
        logps = inputs.policy.detach().float()
        metrics = {
            "rewards/chosen": sd[:, 0].mean(),
            "rewards/rejected": sd[:, -1].mean(),
            "rewards/margins": sdiff.mean(),
            "rewards/accuracies": (sdiff > 0).float().mean(),
            "logps/chosen": logps[:, 0].mean(),
            "logps/rejected": logps[:, -1].mean(),
        }
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
