"""Built-in reward plugins: a bundled task's gold reward, and a trained reward model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ptlight.rewards import Reward, Text, user_text


class GoldReward(Reward):
    """The programmatic gold reward of a bundled task (``task``: e.g. ``sort``), in [0, 1]."""

    name = "gold"

    def __init__(self, *, task: str = "sort") -> None:
        from ptlight.tasks import get_task

        try:
            self.task = get_task(task)
        except KeyError as exc:
            raise ValueError(f"task: {exc.args[0]}") from None
        self.task_name = task

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return [self.task.gold_reward(user_text(p), c) for p, c in zip(prompts, completions)]


class ModelReward(Reward):
    """A reward model trained with ``method=rm`` (``path``: its export dir).

    Each (prompt, completion) is tokenized exactly as the reward model's training pairs were
    (chat template for message prompts, the completion as the assistant turn, closing EOS
    included; ``max_length`` with ``keep_end`` truncation) and scored at its last token, in
    batches of ``batch_size``.
    """

    name = "reward_model"

    def __init__(self, *, path: str | None = None, batch_size: int = 32,
                 max_length: int = 512, dtype: str = "float32") -> None:
        if not path:
            raise ValueError("reward_model needs path=<a `method=rm` run's export dir>")
        from ptlight.model.reward_model import load_reward_model

        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.model, self.tokenizer = load_reward_model(path, dtype)

    def to(self, device: torch.device | str) -> ModelReward:
        self.model.to(device)
        return self

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        from ptlight.data.shapes import Example
        from ptlight.data.tokenize import encode

        rows = []
        for p, c in zip(prompts, completions):
            comp: Text = [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            enc = encode(self.tokenizer, Example(p, [comp]), self.max_length, "keep_end")
            rows.append((enc.prompt, enc.completions[0]))
        return self.model.score_rows(rows, self.tokenizer.pad_token_id,
                                     self.batch_size).cpu().tolist()
