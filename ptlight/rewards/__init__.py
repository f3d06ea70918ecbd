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


def plugin_info(group: str = GROUP) -> list[PluginInfo]:
    """Every entry point of ``group`` (default: the rewards) with its distribution and version."""
    return _plugin_info(group)


__all__ = ["GROUP", "Reward", "available_rewards", "build_reward", "get_reward",
           "plugin_info", "user_text"]
