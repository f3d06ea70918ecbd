"""Online DPO: DPO on pairs sampled from the policy being trained and judged by the reward
plugins (Guo et al. 2024, arXiv 2402.04792; TRL ``OnlineDPOTrainer``, ``trl.experimental``).

Per prompt the rollout holds G = 2 completions (contiguous rows); the one with the higher
reward is chosen (y_w), the other rejected (y_l). With S the summed completion log-prob,

    h = [S_θ(y_w) − S_ref(y_w)] − [S_θ(y_l) − S_ref(y_l)]
    sigmoid:  L = −log σ(β·h)                 (dpo's loss)
    ipo:      L = (h − 1/(2β))²               TRL online DPO's ipo: h summed, not length-normalised

and the batch loss is the mean over the pairs that have a winner. Deliberate deviation from
TRL, which makes the first completion the winner of a tie: a tie (or a NaN reward) carries no
preference, so the pair is skipped (``skipped_pairs`` counts them); a batch of ties only gives
a zero loss that is still connected to the graph. ``losses`` is ``[prompts]``, 0 for a
skipped pair.

Metrics: dpo's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` over the judged pairs (absent when
every pair tied), and ``skipped_pairs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import GroupRollout, Objective, ObjectiveOutput, sigmoid_metrics
from ptlight.objectives.group import choice, grouped, nanstd, reward_metrics

LOSS_TYPES = ("sigmoid", "ipo")


class OnlineDPO(Objective):
    """DPO on reward-judged pairs of on-policy completions (a :class:`GroupRollout`, G = 2)."""

    name = "online_dpo"
    needs_reference = True
    data_kind = "group"

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid") -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        self.beta = beta
        self.loss_type = choice(self.name, "loss_type", loss_type, LOSS_TYPES)

    def advantages(
        self, rewards: torch.Tensor, group_size: int, *, mask: torch.Tensor | None = None,
        logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    ) -> tuple[None, dict[str, torch.Tensor]]:
        """No advantages (the pair's rewards pick chosen and rejected in :meth:`forward`), and
        the reward metrics of the group objectives; a pair with equal rewards counts in
        ``frac_reward_zero_std``."""
        r = grouped(self.name, rewards, group_size)
        if group_size != 2:
            raise ValueError(f"{self.name}: judges one pair per prompt; got group_size="
                             f"{group_size}, sample exactly 2 completions per prompt")
        return None, reward_metrics(rewards, nanstd(r, dim=1))

    def forward(self, inputs: GroupRollout) -> ObjectiveOutput:
        if inputs.group_size != 2:
            raise ValueError(f"{self.name} compares pairs: it needs group_size=2, got "
                             f"{inputs.group_size}")
        if inputs.rewards is None or inputs.ref_logps is None:
            raise ValueError(f"{self.name} needs GroupRollout.rewards and GroupRollout.ref_logps")
        m = inputs.mask.float()
        policy = (inputs.logps.float() * m).sum(-1).view(-1, 2)  # (P, 2)
        ref = (inputs.ref_logps.float() * m).sum(-1).view(-1, 2)
        r = inputs.rewards.float().view(-1, 2)
        # NaN compares False both ways, so a pair with a NaN reward counts as a tie
        judged = (r[:, 0] > r[:, 1]) | (r[:, 1] > r[:, 0])  # (P,)
        first_wins = r[:, 0] > r[:, 1]
        order = torch.stack([~first_wins, first_wins], 1).long()  # column 0: the chosen one
        policy = policy.gather(1, order)  # (P, 2): chosen, rejected
        rho = policy - ref.gather(1, order)
        h = rho[:, 0] - rho[:, 1]
        if self.loss_type == "sigmoid":
            pair_loss = F.softplus(-self.beta * h)
        else:
            pair_loss = (h - 1 / (2 * self.beta)) ** 2
        losses = pair_loss * judged.float()
        # skipped pairs are multiplied by 0, not dropped: an all-tied batch still has a graph
        loss = losses.sum() / judged.sum().clamp(min=1)
        metrics = {"skipped_pairs": (~judged).sum().float()}
        if judged.any():
            keep = judged.nonzero().squeeze(1)
            metrics.update(sigmoid_metrics(self.beta * rho[keep, 0], self.beta * rho[keep, 1],
                                           policy[keep]))
        return ObjectiveOutput(loss=loss, losses=losses.detach(), metrics=metrics)
