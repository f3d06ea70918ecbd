"""SimPO: simple preference optimisation with a reference-free reward (Meng et al. 2024,
arXiv 2405.14734; TRL ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``).

    A(y) = S_θ(y) / max(1, |y|)               (mean token log-prob)
    L = −log σ(β·A(y_w) − β·A(y_l) − γ),      γ = gamma_beta_ratio · β

Hyperparameters as in the SimPO reference code: ``beta`` 2.0 and ``gamma_beta_ratio`` 0.5 (so the
target margin γ is 1.0 at the defaults); ``label_smoothing`` ε gives the conservative form
−(1−ε)·log σ(z) − ε·log σ(−z), off by default. Reference-free: the reward metrics report β·A in
place of β·ρ. At initialisation with A(y_w) = A(y_l) the loss is log(1 + e^γ).
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class SimPO(Objective):
    """Length-normalised, reference-free margin loss (``Logps.policy``/``lengths`` ``[B, 2]``)."""

    name = "simpo"
    needs_reference = False
    data_kind = "pairwise"

    def __init__(
        self, *, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"simpo: beta must be > 0, got {beta}")
        if gamma_beta_ratio < 0:
            raise ValueError(f"simpo: gamma_beta_ratio must be >= 0, got {gamma_beta_ratio}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"simpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = beta
        self.gamma_beta_ratio = gamma_beta_ratio
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.lengths is None:
            raise ValueError("simpo needs completion lengths (Logps.lengths is None)")
        avg = inputs.policy.float() / inputs.lengths.float().clamp(min=1)  # (B, 2) A(y)
        rewards = self.beta * avg
        z = rewards[:, 0] - rewards[:, 1] - self.gamma_beta_ratio * self.beta  # (B,)
        eps = self.label_smoothing
        losses = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
        metrics = sigmoid_metrics(rewards[:, 0], rewards[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
