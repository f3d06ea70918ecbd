"""ptlight-reverse: a word-order reversal task (``ptlight.tasks``: ``reverse``) and its reward
(``ptlight.rewards``: ``reverse``), shipped the way a third party ships them."""

from __future__ import annotations

from collections.abc import Sequence

from ptlight.rewards import Reward, Text, user_text

from ptlight_reverse import task


class ReverseReward(Reward):
    """Fraction of the reversed list's positions a completion gets right, in [0, 1]."""

    name = "reverse"

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return [task.gold_reward(user_text(p), c) for p, c in zip(prompts, completions)]


__all__ = ["ReverseReward", "task"]
