"""RL building blocks of the ``ppo`` method, as pure functions over ``[B, T]`` response-token
tensors with a bool mask (docs/objectives.md, ppo). Tested against hand-computed examples.

- :func:`kl_penalty` — per-token KL estimators k1/k2/k3 of log π − log π_ref.
- :func:`token_rewards` — r_t = −β·kl_t + [t = last]·score.
- :func:`gae` — generalised advantage estimation (Schulman et al. arXiv 1506.02438).
- :func:`masked_whiten` — whitening over valid tokens (advantages; rewards without the mean).
- :class:`AdaptiveKLController` / :class:`FixedKLController` — Ziegler et al. arXiv 1909.08593.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    m = mask.to(x.dtype)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the valid tokens (mean added back when ``shift_mean`` is False);
    masked positions are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate with d = log π_ref − log π: k1 = −d, k2 = d²/2, k3 = eᵈ − 1 − d."""
    d = ref_logps - logps
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d ** 2
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True at the last valid token of each row (none for an empty row)."""
    lengths = mask.sum(1)
    out = torch.zeros_like(mask, dtype=torch.bool)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    out[rows, lengths[rows] - 1] = True
    return out


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """r_t = −β·kl_t + [t = last]·score on valid tokens, 0 elsewhere. ``scores``: ``[B]``.

    Valid tokens must be a prefix of each row (responses start at column 0)."""
    rewards = -beta * kl * mask
    return rewards + last_token_mask(mask) * scores[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[B, T]``: δ_t = r_t + γ·V(t+1) − V(t) with V = 0 past the end,
    A_t = δ_t + γλ·A_{t+1}, R_t = A_t + V(t). Valid tokens must be a prefix of each row."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    t_len = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(t_len)):
        next_value = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface
        return None


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: after each rollout batch of ``n_steps``
    episodes with mean per-sequence KL ``current_kl``,
    e = clip(KL/target − 1, −0.2, 0.2) and β ← β·(1 + e·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL: target and horizon must be > 0")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
