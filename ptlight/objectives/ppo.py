"""PPO's clipped policy and value objective (docs/objectives.md; Schulman et al. arXiv 1707.06347;
Ziegler et al. arXiv 1909.08593; Huang et al. "N+ implementation details" arXiv 2403.17031).

On the response tokens of a rollout (``Rollout.mask``), with masked token means:

    ratio = exp(logp_new − logp_old)
    L_π   = mean max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))
    L_V   = ½ · mean max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)
    L     = L_π + c_v · L_V

The advantages A and returns R come from GAE at rollout time (:func:`ptlight.methods.rl.gae`); the
rollout, the KL-penalised rewards, the KL controller and PPO-ptx are the ``ppo`` method's job
(an objective never sees the model). Hyperparameter names follow TRL: ``cliprange`` (ε),
``cliprange_value`` (ε_v), ``vf_coef`` (c_v).

Metrics (TRL's names): ``policy/approxkl`` (½·mean Δlogp²), ``policy/clipfrac``,
``loss/policy``, ``loss/value``, ``val/clipfrac``, ``val/ratio``, ``val/ratio_var``,
``val/error`` (mean (V − R)²), ``val/mean``, ``val/var``, ``returns/mean``, ``returns/var``.
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import Objective, ObjectiveOutput, Rollout
from ptlight.methods.rl import masked_mean as _mean
from ptlight.methods.rl import masked_var


def _var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_var(x, mask, unbiased=False)


class PPO(Objective):
    """Clipped surrogate policy loss + clipped value loss on a :class:`Rollout`."""

    name = "ppo"
    needs_reference = True
    data_kind = "rollout"

    def __init__(self, *, cliprange: float = 0.2, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1) -> None:
        super().__init__()
        for key, value in (("cliprange", cliprange), ("cliprange_value", cliprange_value),
                           ("vf_coef", vf_coef)):
            if value < 0:
                raise ValueError(f"ppo: {key} must be >= 0, got {value}")
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef

    def forward(self, inputs: Rollout) -> ObjectiveOutput:
        mask = inputs.mask.float()
        adv, ret = inputs.advantages.float(), inputs.returns.float()
        log_ratio = inputs.logps.float() - inputs.old_logps.float()
        ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1.0 - self.cliprange, 1.0 + self.cliprange)
        pg = torch.maximum(pg1, pg2)

        values, old_values = inputs.values.float(), inputs.old_values.float()
        v_clipped = old_values + torch.clamp(values - old_values, -self.cliprange_value,
                                             self.cliprange_value)
        vf1, vf2 = (values - ret) ** 2, (v_clipped - ret) ** 2
        vf = 0.5 * torch.maximum(vf1, vf2)

        token_loss = pg + self.vf_coef * vf
        per_seq = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss_pi, loss_v = _mean(pg, mask), _mean(vf, mask)
        loss = loss_pi + self.vf_coef * loss_v
        with torch.no_grad():
            metrics = {
                "policy/approxkl": 0.5 * _mean(log_ratio ** 2, mask),
                "policy/clipfrac": _mean((pg2 > pg1).float(), mask),
                "loss/policy": loss_pi.detach(),
                "loss/value": loss_v.detach(),
                "val/clipfrac": _mean((vf2 > vf1).float(), mask),
                "val/ratio": _mean(ratio, mask),
                "val/ratio_var": _var(ratio, mask),
                "val/error": _mean(vf1, mask),
                "val/mean": _mean(values, mask),
                "val/var": _var(values, mask),
                "returns/mean": _mean(ret, mask),
                "returns/var": _var(ret, mask),
            }
        return ObjectiveOutput(loss=loss, losses=per_seq.detach(), metrics=metrics)
