"""Pairwise BCO: each completion of a pair classified on its own implicit reward
(Jung et al. 2024, arXiv 2404.04656; TRL ``loss_type="bco_pair"``).

    ρ(y) = S_θ(y) − S_ref(y)
    L = −log σ(β·ρ(y_w)) − log σ(−β·ρ(y_l))

Unlike the DPO family the two terms are not tied by a difference: the chosen completion's
log-ratio is pushed up and the rejected one's down independently. At initialisation the loss is
2·ln 2.

Deviation from TRL: TRL's ``bco_pair`` subtracts a running mean δ of the rewards inside both
sigmoids; this file implements the pairwise form (δ = 0). The running-mean variant is
the unpaired ``bco`` objective (§7).
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class BCOPair(Objective):
    """Binary-classifier loss on both completions of a pair (``Logps.policy`` ``[B, 2]``)."""

    name = "bco_pair"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"bco_pair: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("bco_pair needs reference log-probs (Logps.reference is None)")
        rewards = self.beta * (inputs.policy.float() - inputs.reference.float())  # (B, 2)
        losses = F.softplus(-rewards[:, 0]) + F.softplus(rewards[:, 1])  # (B,)
        metrics = sigmoid_metrics(rewards[:, 0], rewards[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
