"""DPO: direct preference optimisation (Rafailov et al. 2023, arXiv 2305.18290, eq. 7).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = −log σ(β·h)            (softplus(−β·h), numerically stable)

With ``label_smoothing`` ε > 0 this is conservative DPO (cDPO):
``−(1−ε)·log σ(βh) − ε·log σ(−βh)``, TRL's ``sigmoid`` loss with the same parameter name.
At initialisation (policy == reference) h = 0 and the loss is ln 2.

``rpo_alpha`` α > 0 adds α·NLL(y_w), the chosen completion's mean token negative log-likelihood
(RPO, Pang et al. 2024, arXiv 2404.19733; TRL's ``rpo_alpha``, which averages tokens over the
whole batch where this averages per example). On exact-answer tasks plain DPO tends to lower
the likelihood of the chosen answers too; the NLL term keeps it up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class DPO(Objective):
    """Sigmoid DPO loss on pairwise sequence log-probs (``Logps.policy`` ``[B, 2]``)."""

    name = "dpo"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(
        self, *, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float = 0.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"{self.name}: label_smoothing must be in [0, 0.5), got "
                             f"{label_smoothing}")
        if rpo_alpha < 0:
            raise ValueError(f"{self.name}: rpo_alpha must be >= 0, got {rpo_alpha}")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.rpo_alpha = rpo_alpha

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError(f"{self.name} needs reference log-probs (Logps.reference is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        h = rho[:, 0] - rho[:, 1]  # (B,)
        eps = self.label_smoothing
        losses = (1 - eps) * F.softplus(-self.beta * h) + eps * F.softplus(self.beta * h)
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        if self.rpo_alpha > 0:
            if inputs.chosen_nll is None:
                raise ValueError("dpo: rpo_alpha > 0 needs Logps.chosen_nll")
            nll = inputs.chosen_nll.float()
            losses = losses + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach().mean()
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
