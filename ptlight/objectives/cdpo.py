"""cDPO: conservative DPO for noisy preference labels (Mitchell 2023, "A note on DPO with noisy
preferences & relationship to IPO"; HALOs ``cdpo``).

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)

ε is the assumed probability that a label is flipped; the hyperparameter is called
``label_smoothing`` as in TRL (where cDPO is the ``sigmoid`` loss with ``label_smoothing`` > 0).
This is ``dpo`` with ε = 0.1 by default. At initialisation (h = 0) the loss is ln 2.
"""

from __future__ import annotations

from ptlight.objectives.dpo import DPO


class CDPO(DPO):
    """Conservative (label-smoothed) DPO on pairwise sequence log-probs (``[B, 2]``): ``dpo``
    with its ``label_smoothing`` path, a default ε of 0.1 and no RPO term."""

    name = "cdpo"

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta=beta, label_smoothing=label_smoothing)
