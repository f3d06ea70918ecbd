"""ORPO: monolithic preference optimisation with an odds ratio (Hong et al. 2024,
arXiv 2403.07691; TRL ``ORPOTrainer``).

    A(y) = S_θ(y) / max(1, |y|)                 (mean token log-prob, clamped to ≤ −1e−6)
    o(y) = A(y) − log(1 − e^{A(y)})             (log-odds of the geometric-mean token prob)
    L = NLL(y_w) − λ·log σ(o(y_w) − o(y_l))

λ is called ``beta`` (default 0.1) as in TRL's ORPO. o is computed in fp32 with
log(1 − e^A) = log(−expm1(A)); the clamp keeps it finite when A rounds to 0.

NLL(y_w) is ``Logps.chosen_nll`` (mean token NLL of the chosen completion) when the method
provides it; otherwise −A(y_w), which is the same quantity when the NLL is taken over the
completion tokens only. No reference model. Reward metrics report β·A in place of β·ρ (as TRL);
extra metrics: ``nll_loss``, ``log_odds_ratio`` = mean log σ(o_w − o_l) and ``log_odds_chosen``
= mean (o_w − o_l), TRL's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput, sigmoid_metrics

MAX_AVG_LOGP = -1e-6


class ORPO(Objective):
    """NLL plus odds-ratio preference term (``Logps.policy``/``lengths`` ``[B, 2]``)."""

    name = "orpo"
    needs_reference = False
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"orpo: beta (lambda) must be >= 0, got {beta}")
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.lengths is None:
            raise ValueError("orpo needs completion lengths (Logps.lengths is None)")
        avg = inputs.policy.float() / inputs.lengths.float().clamp(min=1)  # (B, 2) A(y)
        a = avg.clamp(max=MAX_AVG_LOGP)
        log_odds = a - torch.log(-torch.expm1(a))  # (B, 2) o(y)
        log_odds_diff = log_odds[:, 0] - log_odds[:, 1]  # (B,)
        ratio = F.logsigmoid(log_odds_diff)
        nll = inputs.chosen_nll.float() if inputs.chosen_nll is not None else -avg[:, 0]
        losses = nll - self.beta * ratio  # (B,)
        metrics = sigmoid_metrics(self.beta * avg[:, 0], self.beta * avg[:, 1], inputs.policy)
        metrics.update(
            {
                "nll_loss": nll.detach().mean(),
                "log_odds_ratio": ratio.detach().mean(),
                "log_odds_chosen": log_odds_diff.detach().mean(),
            }
        )
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
