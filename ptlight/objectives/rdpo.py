"""R-DPO: DPO with a length regulariser (Park et al. 2024, "Disentangling Length from Quality in
Direct Preference Optimization", arXiv 2403.19159).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = −log σ(β·h + α·(|y_w| − |y_l|))

|y| are completion token counts (``Logps.lengths``). When the chosen completion is the longer one
the offset is positive, so the loss is already smaller and the policy gains less from making the
chosen more likely: the length preference in the data is absorbed by the offset instead of being
learnt. α only shifts the logit: it changes how much gradient each pair carries (σ(−z)), not
its direction.

``alpha`` has no default in the paper; it must be tuned against typical length differences
(α·Δ|y| should be O(1)). The default 0 reduces R-DPO to DPO. At initialisation with equal
lengths the loss is ln 2.
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class RDPO(Objective):
    """Length-regularised DPO on pairwise sequence log-probs and lengths (``[B, 2]``)."""

    name = "rdpo"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1, alpha: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"rdpo: beta must be > 0, got {beta}")
        if alpha < 0:
            raise ValueError(f"rdpo: alpha must be >= 0, got {alpha}")
        self.beta = beta
        self.alpha = alpha

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("rdpo needs reference log-probs (Logps.reference is None)")
        if inputs.lengths is None:
            raise ValueError("rdpo needs completion lengths (Logps.lengths is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        lengths = inputs.lengths.float()
        z = self.beta * (rho[:, 0] - rho[:, 1]) + self.alpha * (lengths[:, 0] - lengths[:, 1])
        losses = F.softplus(-z)  # (B,)
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
