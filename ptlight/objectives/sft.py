"""Supervised fine-tuning: next-token cross-entropy on completion tokens (TRL ``SFTTrainer``).

    c_t = −ℓ_θ(t)                       (``loss_type="nll"``)
    c_t = −ℓ_θ(t) · stopgrad(p_θ(t))    (``loss_type="dft"``, dynamic fine-tuning)
    with label smoothing ε: (1−ε)·c_t + ε·(−mean_v log p_θ(v))

``reduction="token"`` (default): Σ m·c / max(1, Σ m) over the batch, so every completion token
weighs the same. ``reduction="sequence"``: mean over examples of each example's token mean
(zero-token examples contribute 0). An all-masked batch gives loss 0, not NaN.
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import Objective, ObjectiveOutput, TokenLogps


class SFT(Objective):
    """Token-level NLL (or DFT) with optional label smoothing."""

    name = "sft"
    needs_reference = False
    data_kind = "sft"

    def __init__(
        self, *, reduction: str = "token", label_smoothing: float = 0.0, loss_type: str = "nll"
    ) -> None:
        super().__init__()
        if reduction not in ("token", "sequence"):
            raise ValueError(f"sft: reduction must be 'token' or 'sequence', got {reduction!r}")
        if loss_type not in ("nll", "dft"):
            raise ValueError(f"sft: loss_type must be 'nll' or 'dft', got {loss_type!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"sft: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type

    def forward(self, inputs: TokenLogps) -> ObjectiveOutput:
        mask = inputs.mask.float()  # (B, T)
        logps = inputs.logps.float()
        cost = -logps
        if self.loss_type == "dft":
            cost = cost * logps.detach().exp()
        if self.label_smoothing > 0:
            if inputs.mean_logp is None:
                raise ValueError("sft: label_smoothing > 0 needs TokenLogps.mean_logp")
            eps = self.label_smoothing
            cost = (1 - eps) * cost + eps * (-inputs.mean_logp.float())
        cost = cost * mask
        n_tok = mask.sum(dim=1)  # (B,)
        losses = cost.sum(dim=1) / n_tok.clamp(min=1)  # per-example token mean
        if self.reduction == "token":
            loss = cost.sum() / mask.sum().clamp(min=1)
        else:
            loss = losses.mean()
        return ObjectiveOutput(loss=loss, losses=losses, metrics={"num_tokens": mask.sum()})
