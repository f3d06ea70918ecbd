"""Bradley–Terry reward-model loss (docs/objectives.md; InstructGPT arXiv 2203.02155, Llama 2
arXiv 2307.09288, Eisenstein et al. arXiv 2312.09244; TRL ``RewardTrainer``).

    Δ = r(x, y_c) − r(x, y_r)
    L = mean(−log σ(Δ − m)) + η · mean((r_c + r_r)²)

- ``m``: the per-pair margin from the data (a ``margin`` column of pairwise rows; 0 without).
  Llama 2 maps rating strength to m (small {1, 2/3, 1/3, 0}, large {3, 2, 1, 0}).
- ``η`` = ``center_rewards_coefficient`` (TRL's name): off by default, 0.01 recommended; it
  keeps rewards centred around 0 so that the reward scale is identifiable.
- K-way (listwise) data: every one of the C(K,2) pairs (i better than j) of a prompt enters,
  each scaled by 1/C(K,2), so a prompt weighs as much as one pair does. Pairs whose ratings tie
  (equal ``Rewards.scores``) are dropped; they still count in C(K,2).
  For K = 2 this is exactly the pairwise loss.

Metrics (TRL's names): ``accuracy`` (Δ > 0 over compared pairs), ``margin`` (mean Δ),
``min_reward``/``mean_reward``/``max_reward`` over every completion, ``num_tokens`` (completion
tokens in the batch), ``center_loss`` (the mean of (r_c + r_r)², logged even when η = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import Objective, ObjectiveOutput, Rewards


class RewardBT(Objective):
    """Bradley–Terry loss on scalar rewards ``[B, K]`` (column 0 best)."""

    name = "reward_bt"
    needs_reference = False
    data_kind = "scores"

    def __init__(self, *, center_rewards_coefficient: float = 0.0) -> None:
        super().__init__()
        if center_rewards_coefficient < 0:
            raise ValueError(
                f"reward_bt: center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}"
            )
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(self, inputs: Rewards) -> ObjectiveOutput:
        r = inputs.rewards.float()  # (B, K)
        b, k = r.shape
        if k < 2:
            raise ValueError(f"reward_bt needs K >= 2 completions per prompt, got {k}")
        i, j = torch.triu_indices(k, k, offset=1, device=r.device)  # the pairs i < j, in order
        delta = r[:, i] - r[:, j]  # (B, P): column i is ranked above column j
        valid = torch.ones_like(delta, dtype=torch.bool)
        if inputs.scores is not None:
            valid = inputs.scores[:, i] > inputs.scores[:, j]  # ties (and misorders) dropped
        if inputs.margins is not None:
            if k != 2:
                raise ValueError("reward_bt: per-pair margins are defined for pairwise data (K=2)")
            delta_m = delta - inputs.margins.float()[:, None]
        else:
            delta_m = delta
        weight = valid.float() / delta.shape[1]  # 1 / C(K,2) per compared pair
        center = (r[:, i] + r[:, j]) ** 2
        losses = (weight * (F.softplus(-delta_m)
                            + self.center_rewards_coefficient * center)).sum(dim=1)
        n = valid.sum().clamp(min=1)
        metrics = {
            "accuracy": ((delta > 0) & valid).sum().float().detach() / n,
            "margin": (delta * valid).sum().detach() / n,
            "min_reward": r.detach().min(),
            "mean_reward": r.detach().mean(),
            "max_reward": r.detach().max(),
            "center_loss": (center * valid).sum().detach() / n,
        }
        if inputs.lengths is not None:
            metrics["num_tokens"] = inputs.lengths.sum().float()
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
