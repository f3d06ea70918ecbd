"""IPO: identity preference optimisation (Azar et al. 2023, arXiv 2310.12036, eq. 17;
TRL ``loss_type="ipo"``).

    ρ̄(y) = [S_θ(y) − S_ref(y)] / |y|          (``length_normalize=True``, default, as TRL)
    h̄ = ρ̄(y_w) − ρ̄(y_l)
    L = (h̄ − 1/(2τ))²

The hyperparameter τ is called ``beta`` as in TRL. ``length_normalize=False`` gives the paper's
form with the summed log-ratio h in place of h̄. TRL length-normalises because the squared loss
regresses the margin onto a fixed target 1/(2τ) that should not depend on how long the
completions are. Lengths are clamped at 1. At initialisation (h̄ = 0) the loss is 1/(4τ²).

Deviation (metrics): ``rewards/*`` are β·ρ̄, the quantity the loss acts on (as TRL, whose IPO
logps are length-averaged), so ``rewards/margins`` approaches β/(2τ) = 0.5 at the optimum;
``logps/*`` stay the summed log-probs.
"""

from __future__ import annotations

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics


class IPO(Objective):
    """Squared-margin IPO loss on pairwise sequence log-probs (``[B, 2]``, lengths ``[B, 2]``)."""

    name = "ipo"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1, length_normalize: bool = True) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"ipo: beta (tau) must be > 0, got {beta}")
        self.beta = beta
        self.length_normalize = bool(length_normalize)

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("ipo needs reference log-probs (Logps.reference is None)")
        rho = inputs.policy.float() - inputs.reference.float()  # (B, 2)
        if self.length_normalize:
            if inputs.lengths is None:
                raise ValueError(
                    "ipo: length_normalize=True needs Logps.lengths "
                    "(or set method.objective.length_normalize=false)"
                )
            rho = rho / inputs.lengths.float().clamp(min=1)
        h = rho[:, 0] - rho[:, 1]  # (B,)
        losses = (h - 1 / (2 * self.beta)) ** 2
        metrics = sigmoid_metrics(self.beta * rho[:, 0], self.beta * rho[:, 1], inputs.policy)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
