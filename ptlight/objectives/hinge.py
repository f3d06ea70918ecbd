"""Hinge loss on the DPO log-ratio margin (SLiC-style calibration with a reference;
Zhao et al. 2023, arXiv 2305.10425; TRL ``loss_type="hinge"``).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = max(0, 1 − β·h)

1/β is the margin in log-ratio units (TRL's convention). At initialisation (h = 0) the loss is 1.
Pairs already separated by more than 1/β contribute neither loss nor gradient.
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class Hinge(Objective):
    """Hinge loss on the reference-relative margin, pairwise sequence log-probs (``[B, 2]``)."""

    name = "hinge"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"hinge: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("hinge needs reference log-probs (Logps.reference is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        losses = torch.relu(1 - self.beta * (rho[:, 0] - rho[:, 1]))  # (B,)
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
