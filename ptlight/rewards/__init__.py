"""Reward plugins: scalar rewards of (prompt, completion) pairs, discovered through the
``ptlight.rewards`` entry-point group exactly as objectives are through ``ptlight.objectives``.

PPO scores its rollouts with one (the ``reward`` config group), evaluation and labelling can use any of
them, and a third party ships a rule-based or judge reward as its own pip package::

    # my_pkg/reward.py
    from ptlight.rewards import Reward

    class Brevity(Reward):
        name = "brevity"
        def __init__(self, *, max_words: int = 20) -> None:
            self.max_words = max_words
        def score(self, prompts, completions):
            return [1.0 - min(len(c.split()), self.max_words) / self.max_words
                    for c in completions]

    # pyproject.toml
    [project.entry-points."ptlight.rewards"]
    brevity = "my_pkg.reward:Brevity"

then ``python -m ptlight method=ppo reward.name=brevity ~reward.task +reward.max_words=10``.
``python -m ptlight.rewards`` lists the installed rewards.

Contract: ``name`` (class attribute); keyword-only hyperparameters; :meth:`Reward.score` takes
the prompts as the data set gives them (a string, or a list of ``{"role", "content"}``
messages) and the completions as decoded text, and returns one float per completion. A reward
that holds a model implements :meth:`Reward.to` to move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ptlight.errors import ConfigError, PluginError
from ptlight.registry import REWARDS, PluginInfo
from ptlight.registry import plugin_info as _plugin_info

GROUP = REWARDS.group
Text = str | list[dict[str, str]]


class Reward:
    """Base class of every reward plugin (built-in or third-party)."""

    name: ClassVar[str] = ""

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> Sequence[float]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Reward:  # noqa: ARG002 - no model by default
        return self

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> torch.Tensor:
        """``[B]`` fp32 rewards on the CPU; a non-finite value is an error naming the plugin."""
        if len(prompts) != len(completions):
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts but "
                             f"{len(completions)} completions")
        out = torch.as_tensor(list(self.score(prompts, completions)), dtype=torch.float32)
        if out.shape != (len(completions),):
            raise PluginError(f"reward plugin {self.name!r} returned shape {tuple(out.shape)} "
                              f"for {len(completions)} completions; expected one float each")
        if not torch.isfinite(out).all():
            raise PluginError(f"reward plugin {self.name!r} returned a non-finite reward")
        return out


def user_text(prompt: Text) -> str:
    """The text of a prompt: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("prompt has no user turn")
    return users[-1]


def available_rewards() -> dict[str, str]:
    """Reward name -> ``"module:attr"`` of its entry point (group ``ptlight.rewards``)."""
    return REWARDS.available()


def get_reward(name: str) -> type[Reward]:
    """The reward class registered under ``name``; ``KeyError`` lists the installed names,
    :class:`PluginError` names a plugin that fails to import or is not a :class:`Reward`."""
    return REWARDS.load(name)


def build_reward(spec: dict[str, Any], key: str = "reward") -> Reward:
    """Instantiate the reward ``spec["name"]`` with the other keys as its settings; errors
    name ``<key>.<field>`` and list the valid keys."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ConfigError(f"{key}.name is not set; installed rewards: {REWARDS.installed()}")
    return REWARDS.build(name, spec, key)


class WeightedRewards:
    """The rewards of RL from several plugins: r = Σ_k w_k · R_k (OBJECTIVES.md §12).

    A plugin may return ``None`` or NaN for a completion it cannot score: that term is left out
    of the sum; a completion no plugin scores is unscorable (NaN), which the group objectives
    exclude from their group's statistics with advantage 0. A plugin that raises, returns the
    wrong count or an infinite value is an error that names it.
    """

    def __init__(self, rewards: Sequence[tuple[str, float, Reward]]) -> None:
        if not rewards:
            raise ConfigError("reward: no reward plugin configured")
        self.rewards = list(rewards)

    def to(self, device: torch.device | str) -> WeightedRewards:
        for _, _, reward in self.rewards:
            reward.to(device)
        return self

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(``[N]`` fp32 total, NaN where unscorable; label -> ``[N]`` each plugin's scores)."""
        n = len(completions)
        total = torch.zeros(n)
        scored = torch.zeros(n, dtype=torch.bool)
        parts: dict[str, torch.Tensor] = {}
        for label, weight, reward in self.rewards:
            try:
                raw = list(reward.score(prompts, completions))
            except Exception as exc:  # a plugin's own failure, named
                raise PluginError(f"reward plugin {label!r} raised {type(exc).__name__}: {exc}"
                                  ) from exc
            if len(raw) != n:
                raise PluginError(f"reward plugin {label!r} returned {len(raw)} scores for {n} "
                                  "completions; expected one float (or None) each")
            values = torch.tensor([float("nan") if v is None else float(v) for v in raw])
            if torch.isinf(values).any():
                raise PluginError(f"reward plugin {label!r} returned an infinite reward")
            ok = ~torch.isnan(values)
            total = total + torch.where(ok, weight * values, torch.zeros_like(values))
            scored |= ok
            parts[label] = values
        return torch.where(scored, total, torch.full_like(total, float("nan"))), parts


def build_rewards(spec: Any, key: str = "reward") -> WeightedRewards:
    """A :class:`WeightedRewards` from ``reward``: one plugin spec (``{name: gold, ...}``) or a
    list of them, each with an optional ``weight`` (default 1.0)."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    built: list[tuple[str, float, Reward]] = []
    for i, one in enumerate(specs):
        where = key if len(specs) == 1 and not isinstance(spec, (list, tuple)) else f"{key}[{i}]"
        if not isinstance(one, dict):
            raise ConfigError(f"{where} must be a reward plugin spec such as "
                              f"{{name: gold, weight: 1.0}}, got {one!r}")
        one = dict(one)
        weight = one.pop("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.weight={weight!r} is not a number") from None
        reward = build_reward(one, key=where)
        label = one["name"]
        if label in {b[0] for b in built}:
            label = f"{label}_{i}"
        built.append((label, weight, reward))
    return WeightedRewards(built)


def plugin_info(group: str = GROUP) -> list[PluginInfo]:
    """Every entry point of ``group`` (default: the rewards) with its distribution and version."""
    return _plugin_info(group)


__all__ = ["GROUP", "Reward", "WeightedRewards", "available_rewards", "build_reward",
           "build_rewards", "get_reward", "plugin_info", "user_text"]
