"""REINFORCE++-baseline (Hu 2025, arXiv 2501.03262; OpenRLHF ``advantage_estimator=
reinforce_baseline``): a group-mean baseline, the KL to the reference as a per-token reward
penalty, and advantages whitened over the whole batch.

Advantages, at rollout time (:meth:`ReinforcePP.advantages`), per token of completion i:

    a_i  = r_i − mean_g r                                  group baseline (NaN rewards left out)
    r_t  = −β·(ℓ_old(t) − ℓ_ref(t)) + [t = last]·a_i       k1 penalty, score at the last token
    G_t  = Σ_{s ≥ t} r_s                                   returns-to-go, γ = 1
    A_t  = (G_t − mean G) / (std G + 1e-8)                 over the valid tokens of the batch

With β = 0 every token of a completion carries the same G_t = a_i, so A is ``[B]``; with
β > 0 it is ``[B, T]``. An unscorable completion (NaN reward) is left out of the whitening
statistics and gets A = 0. The std has Bessel's correction as everywhere in the group
objectives; OpenRLHF uses the population variance, (G − mean)·rsqrt(max(var, 1e-8)), which
differs by a factor √(n/(n−1)) over n tokens.

Loss: PPO's clipped token surrogate, w_t = exp(ℓ_θ(t) − ℓ_old(t)),
L = Σ m·(−min(w·A, clip(w, 1 − ε, 1 + ε_high)·A)) / Σ m over the batch's tokens, OpenRLHF's
default token-level aggregation (``PolicyLoss(token_level_loss=True)``; TRL's ``bnpo``). The KL
is not a loss term. Defaults: OpenRLHF's ``--init_kl_coef`` 0.01 and ``--eps_clip`` 0.2.

Metrics: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (token
means); from :meth:`ReinforcePP.advantages`: ``reward``, ``reward_std``, ``frac_reward_zero_std``
and ``kl`` (token mean of ℓ_old − ℓ_ref, beta > 0).
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import GroupRollout, Objective, ObjectiveOutput
from ptlight.objectives.group import (clipped_surrogate, grouped, masked_mean, nanstd,
                                      policy_terms, reward_metrics, set_clip_and_beta)


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True at the last True of each row of ``mask`` (none in an empty row)."""
    m = mask.long()
    after = m.flip(-1).cumsum(-1).flip(-1)  # valid tokens at or after t
    return mask.bool() & (after == 1)


class ReinforcePP(Objective):
    """REINFORCE++-baseline: clipped token surrogate on whitened group-baseline returns."""

    name = "reinforce_pp"
    needs_reference = True  # at the default beta; an instance sets it from its beta
    data_kind = "group"

    def __init__(self, *, beta: float = 0.01, epsilon: float = 0.2,
                 epsilon_high: float | None = None) -> None:
        super().__init__()
        set_clip_and_beta(self, epsilon, epsilon_high, beta)

    def advantages(
        self, rewards: torch.Tensor, group_size: int, *, mask: torch.Tensor | None = None,
        logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Whitened advantages — ``[B]`` when beta = 0, ``[B, T]`` when beta > 0 — and the
        reward metrics (plus ``kl``, the token mean of ℓ_old − ℓ_ref). ``mask`` is always
        needed (the whitening is over tokens); ``logps`` (rollout time) and ``ref_logps`` when
        beta > 0. Call it on the whole generation batch: the whitening spans it."""
        if group_size < 2:
            raise ValueError(f"{self.name}: the group-mean baseline needs group_size >= 2, got "
                             f"{group_size}")
        if mask is None:
            raise ValueError(f"{self.name}: advantages() needs the completion mask")
        g = grouped(self.name, rewards, group_size)  # (P, G)
        scorable = ~torch.isnan(g.flatten())  # (B,)
        score = torch.nan_to_num(g - torch.nanmean(g, 1, keepdim=True), nan=0.0).flatten()
        valid = mask.bool() & scorable.unsqueeze(1)  # (B, T)
        metrics = reward_metrics(rewards, nanstd(g, dim=1))
        if self.beta > 0:
            if logps is None or ref_logps is None:
                raise ValueError(f"{self.name}: beta > 0 needs logps and ref_logps for the KL "
                                 "penalty")
            kl = logps.float() - ref_logps.float()  # k1, (B, T)
            token_r = -self.beta * kl * mask.float() + last_token(mask) * score.unsqueeze(1)
            returns = token_r.flip(-1).cumsum(-1).flip(-1)  # (B, T), γ = 1
            metrics["kl"] = masked_mean(kl, mask)
        else:
            returns = score.unsqueeze(1).expand(mask.shape)
        flat = returns[valid]
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        adv = (returns - (flat.mean() if flat.numel() else 0.0)) / (std + 1e-8)
        adv = adv * valid.float()
        if self.beta == 0:
            # one value per completion: that of its tokens (0 for an empty or unscorable one)
            adv = adv.sum(-1) / valid.float().sum(-1).clamp(min=1.0)
        return adv, metrics

    def forward(self, inputs: GroupRollout) -> ObjectiveOutput:
        logps, mask, old = policy_terms(self.name, inputs)
        token_loss, metrics = clipped_surrogate(
            logps, old, inputs.advantages, mask, eps_low=self.epsilon_low,
            eps_high=self.epsilon_high, sequence=False)
        m = mask.float()
        summed = (token_loss * m).sum(-1)  # (B,)
        loss = summed.sum() / m.sum().clamp(min=1.0)
        per_seq = summed / m.sum(-1).clamp(min=1.0)
        return ObjectiveOutput(loss=loss, losses=per_seq.detach(), metrics=metrics)
