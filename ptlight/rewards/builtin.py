"""Built-in reward plugins: a bundled task's gold reward, and a trained reward model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ptlight.rewards import Reward, Text


class GoldReward(Reward):
    """The gold reward of a task (``task``: a registered task's name such as ``sort``, or a
    task made of files: a spec or a ``.yaml``/``.json`` file)."""

    name = "gold"

    def __init__(self, *, task: Any = "sort") -> None:
        from ptlight.errors import ConfigError
        from ptlight.tasks import resolve_task

        try:
            resolved = resolve_task(task, key="reward.task")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if resolved is None:
            raise ValueError("task is null: name the task whose gold reward scores rollouts")
        self.task, self.task_name = resolved, resolved.name

    def to(self, device: torch.device | str) -> Reward:
        self.task.to(device)
        return self

    def score(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return self.task.score(prompts, completions)


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
        for key, value, least in (("batch_size", batch_size, 1), ("max_length", max_length, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key}={value!r}: write a whole number >= {least}")
        from ptlight.model.backbone import torch_dtype
        from ptlight.model.reward_model import load_reward_model

        torch_dtype(dtype, "dtype")  # a ConfigError, named by the registry like the ones above
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
