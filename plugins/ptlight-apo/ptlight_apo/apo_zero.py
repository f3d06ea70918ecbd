"""APO-zero: anchored preference optimisation (D'Oosterlinck et al. 2024, arXiv 2408.06266;
TRL ``loss_type="apo_zero"``).

    ρ(y) = S_θ(y) − S_ref(y)
    L = (1 − σ(β·ρ(y_w))) + σ(β·ρ(y_l))

Unlike DPO, which only constrains the difference ρ(y_w) − ρ(y_l), APO-zero anchors each term:
it raises the likelihood of the chosen completion and lowers that of the rejected one. Use it
when the chosen completions are better than what the model already produces. At initialisation
(ρ = 0) the loss is 1.

Written against ptlight's public API only (``Objective``, ``ObjectiveOutput``, ``Logps``) and
registered through the ``ptlight.objectives`` entry-point group, as any third party would.
"""

from __future__ import annotations

import torch

from ptlight.objectives import Logps, Objective, ObjectiveOutput


class APOZero(Objective):
    """APO-zero loss on pairwise sequence log-probs (``Logps.policy`` ``[B, 2]``)."""

    name = "apo_zero"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"apo_zero: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("apo_zero needs reference log-probs (Logps.reference is None)")
        rewards = self.beta * (inputs.policy.float() - inputs.reference.float())  # (B, 2)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        losses = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)  # (B,)
        c, r = chosen.detach(), rejected.detach()
        logps = inputs.policy.detach().float()
        metrics = {
            "rewards/chosen": c.mean(),
            "rewards/rejected": r.mean(),
            "rewards/margins": (c - r).mean(),
            "rewards/accuracies": (c > r).float().mean(),
            "logps/chosen": logps[:, 0].mean(),
            "logps/rejected": logps[:, 1].mean(),
        }
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
