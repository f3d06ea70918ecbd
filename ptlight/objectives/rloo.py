"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740;
Kool et al. 2019). Matches TRL 1.16 ``RLOOTrainer``.

Advantages, at rollout time (:meth:`RLOO.advantages`), from the G rewards of a prompt's group:

    r_i ← r_i − β · Σ_t m_t (ℓ_old(t) − ℓ_ref(t))          KL as a sequence reward penalty (k1)
    A_i = r_i − (Σ_{j≠i} r_j) / (G − 1)
    normalize_advantages: A ← (A − mean_B A) / (std_B A + 1e-4)

NaN rewards (unscorable) are left out of their siblings' baselines (the divisor is the number
of scorable siblings) and get A = 0; so does the only scorable completion of a group.

Loss: the paper treats the whole completion as one action, so the importance weight is the
ratio of sequence probabilities and the loss a mean over completions (no token averaging):

    w_i = exp(Σ_t m_t (ℓ_θ(t) − ℓ_old(t)))
    L   = mean_i −min(w_i·A_i, clip(w_i, 1 − ε, 1 + ε_high)·A_i)

This follows TRL's ``RLOOTrainer``; the token-level form of docs/objectives.md §group RL is
grpo's (``method.objective.name=grpo`` with ``scale_rewards=none`` is the closest token-level
relative). At μ = 1 (``old_logps=None``) w ≡ 1. Defaults are TRL's ``RLOOConfig``.

Metrics (TRL's names): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (means over completions); from :meth:`RLOO.advantages`: ``reward``,
``reward_std``, ``frac_reward_zero_std`` and ``kl`` (token mean of ℓ_old − ℓ_ref, beta > 0).
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import GroupRollout, Objective, ObjectiveOutput
from ptlight.objectives.group import (grouped, masked_mean, nanstd, policy_terms,
                                      reward_metrics, set_clip_and_beta)


class RLOO(Objective):
    """Leave-one-out REINFORCE with a clipped sequence-level ratio on a :class:`GroupRollout`."""

    name = "rloo"
    needs_reference = True  # at the default beta; an instance sets it from its beta
    data_kind = "group"

    def __init__(self, *, beta: float = 0.05, epsilon: float = 0.2,
                 epsilon_high: float | None = None, normalize_advantages: bool = False) -> None:
        super().__init__()
        set_clip_and_beta(self, epsilon, epsilon_high, beta)
        self.normalize_advantages = normalize_advantages

    def advantages(
        self, rewards: torch.Tensor, group_size: int, *, mask: torch.Tensor | None = None,
        logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``[B]`` advantages and the reward metrics (plus ``kl``, the token mean of
        ℓ_old − ℓ_ref, when beta > 0). ``logps``: ``[B, T]`` rollout-time log-probs,
        ``ref_logps`` the reference's, ``mask`` the completion mask (all three when beta > 0)."""
        if group_size < 2:
            raise ValueError(f"{self.name}: the leave-one-out baseline needs group_size >= 2, "
                             f"got {group_size}")
        r = grouped(self.name, rewards, group_size).flatten()  # (B,)
        metrics: dict[str, torch.Tensor] = {}
        if self.beta > 0:
            if mask is None or logps is None or ref_logps is None:
                raise ValueError(f"{self.name}: beta > 0 needs mask, logps and ref_logps for the "
                                 "KL penalty")
            token_kl = logps.float() - ref_logps.float()  # k1, (B, T)
            r = r - self.beta * (token_kl * mask.float()).sum(-1)
            metrics["kl"] = masked_mean(token_kl, mask)
        g = r.view(-1, group_size)  # (P, G)
        scorable = (~torch.isnan(g)).sum(1, keepdim=True)
        baseline = (torch.nansum(g, 1, keepdim=True) - g) / (scorable - 1)
        adv = (g - baseline).flatten()
        if self.normalize_advantages:
            adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
        metrics.update(reward_metrics(rewards, nanstd(g, dim=1)))
        return torch.nan_to_num(adv, nan=0.0), metrics

    def forward(self, inputs: GroupRollout) -> ObjectiveOutput:
        logps, mask, old_logps = policy_terms(self.name, inputs)
        m = mask.float()
        seq = (logps * m).sum(-1)  # (B,)
        old = (old_logps.float() * m).sum(-1)
        adv = inputs.advantages.float()
        w = torch.exp(seq - old)
        clipped = torch.clamp(w, 1 - self.epsilon_low, 1 + self.epsilon_high)
        losses = -torch.min(w * adv, clipped * adv)  # (B,)
        with torch.no_grad():
            low = ((w < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((w > 1 + self.epsilon_high) & (adv > 0)).float()
            metrics = {"clip_ratio/low_mean": low.mean(), "clip_ratio/high_mean": high.mean(),
                       "clip_ratio/region_mean": torch.maximum(low, high).mean()}
        return ObjectiveOutput(loss=losses.mean(), losses=losses.detach(), metrics=metrics)
