"""Robust DPO: unbiased DPO loss under label noise (Chowdhury et al. 2024, arXiv 2403.00409;
TRL ``loss_type="robust"``).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = [(1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)

ε ∈ [0, 0.5) is the label-flip rate (TRL's ``label_smoothing``). The loss is an unbiased estimate
of the clean-label DPO loss, so it can go negative; it is deliberately not clamped.
At initialisation (h = 0) the loss is ln 2 for every ε.
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class Robust(Objective):
    """Robust (noise-corrected) DPO on pairwise sequence log-probs (``[B, 2]``)."""

    name = "robust"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"robust: beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}"
            )
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("robust needs reference log-probs (Logps.reference is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        z = self.beta * (rho[:, 0] - rho[:, 1])  # (B,)
        eps = self.label_smoothing
        losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
