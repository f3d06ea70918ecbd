"""cDPO: conservative DPO for noisy preference labels (Mitchell 2023, "A note on DPO with noisy
preferences & relationship to IPO"; HALOs ``cdpo``).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)

ε is the assumed probability that a label is flipped; the hyperparameter is called
``label_smoothing`` as in TRL (where cDPO is the ``sigmoid`` loss with ``label_smoothing`` > 0).
This is ``dpo`` with ε = 0.1 by default. At initialisation (h = 0) the loss is ln 2.
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class CDPO(Objective):
    """Conservative (label-smoothed) DPO on pairwise sequence log-probs (``[B, 2]``)."""

    name = "cdpo"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"cdpo: beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"cdpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("cdpo needs reference log-probs (Logps.reference is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        z = self.beta * (rho[:, 0] - rho[:, 1])  # (B,)
        eps = self.label_smoothing
        losses = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
