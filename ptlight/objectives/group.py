"""Shared pieces of the critic-free RL objectives (``data_kind = "group"``: grpo, rloo,
reinforce_pp, online_dpo), as plain functions over a :class:`~ptlight.objectives.GroupRollout`
(docs/objectives.md, group RL).

- :func:`nanstd` — NaN-aware standard deviation with Bessel's correction (TRL's ``nanstd``).
- :func:`grouped` — ``[B]`` rewards as ``[prompts, G]``, with the shape checks.
- :func:`reward_metrics` — TRL's ``reward``, ``reward_std``, ``frac_reward_zero_std``.
- :func:`clipped_surrogate` — the clipped importance-weighted policy-gradient term per token
  (token or GSPO sequence weights) and its clip-ratio metrics.
- :func:`choice` — a hyperparameter checked against its valid values.
- :func:`set_clip_and_beta` — the clip range and KL coefficient the clipped objectives share.
- :func:`policy_terms` — the current and rollout-time log-probs a clipped loss starts from.

NaN rewards mark unscorable completions: every reward plugin returned None for them.
"""

from __future__ import annotations

import torch


def choice(objective: str, key: str, value: object, valid: tuple[str, ...]) -> str:
    """``value`` when it is one of ``valid``, else a ``ValueError`` naming ``key`` and them."""
    if value not in valid:
        raise ValueError(f"{objective}: {key} must be one of {', '.join(valid)}; got {value!r}")
    return str(value)


def set_clip_and_beta(objective, epsilon: float, epsilon_high: float | None,
                      beta: float) -> None:
    """Check ε, ε_high and β (each ≥ 0) and set ``epsilon_low``, ``epsilon_high`` (ε unless
    given), ``beta`` and ``needs_reference`` (the reference model is built only for β > 0)."""
    for key, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("beta", beta)):
        if value is not None and value < 0:
            raise ValueError(f"{objective.name}: {key} must be >= 0, got {value}")
    objective.epsilon_low = epsilon
    objective.epsilon_high = epsilon if epsilon_high is None else epsilon_high
    objective.beta = beta
    objective.needs_reference = beta > 0


def policy_terms(objective: str, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logps, mask, old_logps)`` of a :class:`~ptlight.objectives.GroupRollout` whose
    advantages are set; ``old_logps`` is ``logps.detach()`` for one update per rollout."""
    if inputs.advantages is None:
        raise ValueError(f"{objective} needs GroupRollout.advantages (from advantages())")
    logps = inputs.logps.float()
    old = logps.detach() if inputs.old_logps is None else inputs.old_logps
    return logps, inputs.mask, old


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (as ``torch.std``); NaN where
    fewer than two values are left."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def grouped(objective: str, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` rewards viewed as ``[B / G, G]`` (the G completions of a prompt are contiguous)."""
    if rewards.dim() != 1:
        raise ValueError(f"{objective}: rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{objective}: {rewards.numel()} rewards do not split into groups of "
                         f"group_size={group_size}")
    return rewards.float().view(-1, group_size)


def reward_metrics(rewards: torch.Tensor, group_std: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward metrics: mean and std of the scorable rewards, and the fraction of groups
    whose rewards are all equal (``group_std`` ``[prompts]``; NaN, one scorable completion,
    does not count)."""
    zero = torch.isclose(group_std, torch.zeros_like(group_std))
    return {"reward": torch.nanmean(rewards.float()),
            "reward_std": nanstd(rewards.float()),
            "frac_reward_zero_std": zero.float().mean()}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float, eps_high: float, sequence: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−min(w·A, clip(w, 1 − ε_low, 1 + ε_high)·A) and TRL's clip-ratio metrics.

    Token level: w_t = exp(ℓ_θ(t) − ℓ_old(t)), result ``[B, T]``. Sequence level (GSPO):
    w = exp(Σ_t m_t(ℓ_θ − ℓ_old) / max(1, |y|)), result ``[B, 1]`` (broadcasts over tokens).
    ``advantages``: ``[B]`` or ``[B, T]``. The clip metrics count a token (sequence level: a
    completion) whose weight left the trust region on the side where the clip is active:
    ``low`` w < 1 − ε_low with A < 0, ``high`` w > 1 + ε_high with A > 0.
    """
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1)
    log_ratio = logps.float() - old_logps.float()  # (B, T)
    m = mask.float()
    if sequence:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    else:
        log_w = log_ratio
    w = torch.exp(log_w)
    clipped = torch.clamp(w, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(w * adv, clipped * adv)
    with torch.no_grad():
        low = ((w < 1 - eps_low) & (adv < 0)).float()
        high = ((w > 1 + eps_high) & (adv > 0)).float()
        region = torch.maximum(low, high)

        def mean(x: torch.Tensor) -> torch.Tensor:
            # sequence level: one value per completion, every completion counts
            return x.mean() if x.shape[1] == 1 else masked_mean(x, mask)

        metrics = {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
                   "clip_ratio/region_mean": mean(region)}
    return loss, metrics
