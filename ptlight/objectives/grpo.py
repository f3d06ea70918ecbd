"""GRPO: group-relative policy optimisation, with the DAPO, Dr. GRPO and GSPO variants TRL
names by option (Shao et al. 2024, arXiv 2402.03300; DAPO arXiv 2503.14476; Dr. GRPO arXiv
2503.20783; GSPO arXiv 2507.18071). Matches TRL 1.16 ``GRPOTrainer``.

Advantages, at rollout time (:meth:`GRPO.advantages`), one per completion from its reward r_i
and its group's G rewards (std with Bessel's correction; NaN rewards left out):

    scale_rewards=group:  A_i = (r_i − mean_g r) / (std_g r + 1e-4)
    scale_rewards=batch:  A_i = (r_i − mean_g r) / (std_B r + 1e-4)     std over the batch
    scale_rewards=none:   A_i =  r_i − mean_g r                         (Dr. GRPO)

A completion with a NaN reward (unscorable) gets A = 0, and so does every completion of a
group whose rewards are all equal (TRL returns float noise of order 1e-4 there).

Loss for token t of completion i (m: completion mask, ℓ_old: log-probs at rollout time):

    w_t = exp(ℓ_θ(t) − ℓ_old(t))                           importance_sampling_level=token
    w   = exp(Σ_t m_t (ℓ_θ(t) − ℓ_old(t)) / |y_i|)          importance_sampling_level=sequence
    L_t = −min(w·A_i, clip(w, 1 − ε, 1 + ε_high)·A_i) + β·(e^d − d − 1),  d = ℓ_ref(t) − ℓ_θ(t)

aggregated by ``loss_type``:

    grpo:     mean_i [ Σ_t m L_t / |y_i| ]
    bnpo:     Σ m L / Σ m                                    (this batch)
    dr_grpo:  Σ m L / (B · max_completion_length)
    dapo:     Σ m L / num_items_in_batch                     (tokens of the generation batch)

TRL also divides grpo/bnpo/dr_grpo by the gradient-accumulation steps; Lightning does that
here. At μ = 1 (``old_logps=None``) every w is exactly 1 and the clip never fires.
``ObjectiveOutput.losses`` is each completion's token mean Σ_t m L_t / |y_i| (0 when empty).

Metrics (TRL's names): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (token means; sequence level: means over completions), ``kl`` (token
mean of k3, beta > 0); from :meth:`GRPO.advantages`: ``reward``, ``reward_std``,
``frac_reward_zero_std`` (fraction of groups with equal rewards; TRL reports the batch std's
test instead under ``scale_rewards=batch``).
"""

from __future__ import annotations

import torch

from ptlight.objectives.base import GroupRollout, Objective, ObjectiveOutput
from ptlight.objectives.group import (
    choice,
    clipped_surrogate,
    grouped,
    masked_mean,
    nanstd,
    policy_terms,
    reward_metrics,
    set_clip_and_beta,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


class GRPO(Objective):
    """Clipped group-relative policy loss on a :class:`GroupRollout`."""

    name = "grpo"
    needs_reference = False  # at the default beta; an instance sets it from its beta
    data_kind = "group"

    def __init__(
        self, *, loss_type: str = "dapo", scale_rewards: str | bool = "group",
        importance_sampling_level: str = "token", epsilon: float = 0.2,
        epsilon_high: float | None = None, beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.loss_type = choice(self.name, "loss_type", loss_type, LOSS_TYPES)
        # TRL reads the old boolean form: True -> group, False -> none
        if isinstance(scale_rewards, bool):
            scale_rewards = "group" if scale_rewards else "none"
        self.scale_rewards = choice(self.name, "scale_rewards", scale_rewards, SCALE_REWARDS)
        self.importance_sampling_level = choice(
            self.name, "importance_sampling_level", importance_sampling_level, IS_LEVELS)
        set_clip_and_beta(self, epsilon, epsilon_high, beta)

    def advantages(
        self, rewards: torch.Tensor, group_size: int, *, mask: torch.Tensor | None = None,
        logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``[B]`` advantages of the rewards ``[B]`` of a whole generation batch (gathered over
        ranks for ``scale_rewards=batch``) and the reward metrics. ``mask``, ``logps`` and
        ``ref_logps`` are not used (grpo's KL is a loss term)."""
        r = grouped(self.name, rewards, group_size)  # (P, G)
        if group_size == 1 and self.scale_rewards == "group":
            raise ValueError(f"{self.name}: scale_rewards=group needs group_size >= 2 (the std "
                             "of one reward is undefined); sample G >= 2 completions per prompt "
                             "or set scale_rewards=none")
        group_std = nanstd(r, dim=1) if group_size > 1 else torch.zeros_like(r[:, 0])  # (P,)
        adv = r - torch.nanmean(r, dim=1, keepdim=True)
        if self.scale_rewards == "group":
            adv = adv / (group_std.unsqueeze(1) + 1e-4)
        elif self.scale_rewards == "batch":
            batch_std = nanstd(r.flatten()) if r.numel() > 1 else r.new_zeros(())
            adv = adv / (batch_std + 1e-4)
        zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
        adv = torch.where(zero_std.unsqueeze(1), torch.zeros_like(adv), adv)
        return torch.nan_to_num(adv, nan=0.0).flatten(), reward_metrics(rewards, group_std)

    def forward(self, inputs: GroupRollout) -> ObjectiveOutput:
        logps, mask, old = policy_terms(self.name, inputs)
        token_loss, metrics = clipped_surrogate(
            logps, old, inputs.advantages, mask, eps_low=self.epsilon_low,
            eps_high=self.epsilon_high, sequence=self.importance_sampling_level == "sequence")
        if self.beta > 0:
            if inputs.ref_logps is None:
                raise ValueError(f"{self.name}: beta > 0 needs GroupRollout.ref_logps")
            d = inputs.ref_logps.float() - logps
            kl = torch.exp(d) - d - 1  # k3, (B, T)
            token_loss = token_loss + self.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        token_loss = token_loss.expand_as(logps)  # sequence level without beta: (B, 1)
        m = mask.float()
        summed = (token_loss * m).sum(-1)  # (B,)
        per_seq = summed / m.sum(-1).clamp(min=1.0)
        if self.loss_type == "grpo":
            loss = per_seq.mean()
        elif self.loss_type == "bnpo":
            loss = summed.sum() / m.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            if inputs.max_completion_length is None:
                raise ValueError(f"{self.name}: loss_type=dr_grpo needs "
                                 "GroupRollout.max_completion_length")
            loss = summed.sum() / (logps.shape[0] * inputs.max_completion_length)
        else:  # dapo
            n = m.sum() if inputs.num_items_in_batch is None else inputs.num_items_in_batch
            denominator = torch.as_tensor(n, dtype=summed.dtype, device=summed.device)
            loss = summed.sum() / denominator.clamp(min=1.0)
        return ObjectiveOutput(loss=loss, losses=per_seq.detach(), metrics=metrics)
