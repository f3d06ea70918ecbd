"""SLiC-HF: sequence likelihood calibration with a hinge margin plus a likelihood regulariser
(Zhao et al. 2023, arXiv 2305.10425; HALOs ``slic``).

    L = max(0, δ − S_θ(y_w) + S_θ(y_l)) − λ·S_θ(y_ref)

Reference-free: S are summed policy log-probs, no reference model. As in HALOs, the regularisation
target y_ref is the chosen completion y_w, so the second term is λ times its summed token NLL
(= ``chosen_nll``·|y_w| when that is the mean over the same tokens) and is read directly from
``Logps.policy[:, 0]``; no extra input is needed. Names follow HALOs: ``delta`` is the margin
(HALOs ``beta``), ``lambda_coef`` the regulariser weight. SLiC has no β; the reward metrics
report the raw sums S (β = 1) in place of β·ρ.
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class SLiC(Objective):
    """Hinge calibration on summed log-probs plus chosen NLL (``Logps.policy`` ``[B, 2]``)."""

    name = "slic"
    needs_reference = False
    data_kind = "pairwise"

    def __init__(self, *, delta: float = 1.0, lambda_coef: float = 0.1) -> None:
        super().__init__()
        if delta <= 0:
            raise ValueError(f"slic: delta must be > 0, got {delta}")
        if lambda_coef < 0:
            raise ValueError(f"slic: lambda_coef must be >= 0, got {lambda_coef}")
        self.delta = delta
        self.lambda_coef = lambda_coef

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        logps = inputs.policy.float()  # (B, 2)
        calibration = torch.relu(self.delta - logps[:, 0] + logps[:, 1])  # (B,)
        nll = -logps[:, 0]
        losses = calibration + self.lambda_coef * nll
        metrics = sigmoid_metrics(logps[:, 0], logps[:, 1], inputs.policy)
        metrics.update(
            {"calibration_loss": calibration.detach().mean(), "nll_loss": nll.detach().mean()}
        )
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
