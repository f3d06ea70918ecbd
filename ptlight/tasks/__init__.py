"""Bundled tasks: generators of every data shape plus a programmatic gold reward.

A task module provides ``make_rows(kind, n, seed, split)`` and
``gold_reward(prompt, completion) -> float`` (prompt = the user turn's text); optionally
``gold_metrics(samples) -> dict[str, float]``, extra metrics of the gold eval over its scored
samples (``prompt``, ``completion``, ``reward``), e.g. the safety task's refusal rates; and
``reference_answer(prompt) -> str``, the answer the acceptance metric measures edit distance to.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"sort": "ptlight.tasks.sort", "safety": "ptlight.tasks.safety"}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; bundled tasks: {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])
