"""TDPO: token-level DPO (Zeng et al. 2024, arXiv 2404.11999, eq. 17 and 18).

With D_w = Σ_t KL(p_ref ‖ p_θ) over y_w's positions (the sequential KL, full vocabulary at each
position; :mod:`ptlight.engine.token_terms`) and D_l the same over y_l:

    h   = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    TDPO1: L = −log σ(β·h − β·(D_l − D_w))
    TDPO2: L = −log σ(β·h − α·β·(D_l − sg(D_w)))        (sg: stop-gradient)

TDPO1 is SparsePO with m^u ≡ m^d ≡ 1 (tested). ``variant`` picks the form (default 2, the
paper's main one), ``alpha`` α (default 0.5, the paper's). At initialisation the loss is ln 2.
Metrics: the DPO metrics and ``kl/chosen``, ``kl/rejected`` (mean D_w, D_l).
"""

from __future__ import annotations

import torch.nn.functional as F

from ptlight.objectives.base import Objective, ObjectiveOutput
from ptlight.objectives.sparsepo import pair_metrics
from ptlight.objectives.tokens import TokenTerms, require


class TDPO(Objective):
    """TDPO1 / TDPO2 on per-token log-probs and KL to the reference."""

    name = "tdpo"
    needs_reference = True
    data_kind = "pairwise"
    token_terms = ("logp", "ref_logp", "ref_kl")

    def __init__(self, *, beta: float = 0.1, alpha: float = 0.5, variant: int = 2) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"tdpo: beta must be > 0, got {beta}")
        if variant not in (1, 2):
            raise ValueError(f"tdpo: variant={variant!r}; use 1 (TDPO1) or 2 (TDPO2)")
        if alpha < 0:
            raise ValueError(f"tdpo: alpha must be >= 0, got {alpha}")
        self.beta, self.alpha, self.variant = beta, alpha, variant

    def forward(self, inputs: TokenTerms) -> ObjectiveOutput:
        q = inputs.logps.float() - require(inputs, "ref_logps", self.name).float()  # (M,)
        rho = inputs.columns(q)  # (B, 2)
        kl = inputs.columns(require(inputs, "ref_kl", self.name).float())  # (B, 2): D_w, D_l
        h = rho[:, 0] - rho[:, 1]
        if self.variant == 1:
            delta = kl[:, 1] - kl[:, 0]
        else:
            delta = self.alpha * (kl[:, 1] - kl[:, 0].detach())
        losses = F.softplus(-self.beta * (h - delta))
        metrics = pair_metrics(inputs, rho, self.beta)
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)

