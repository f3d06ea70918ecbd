"""Tasks: prompts in the data shapes a task supports plus a programmatic gold reward.

Tasks are plugins of the entry-point group ``ptlight.tasks`` (:mod:`ptlight.registry`); the
bundled ``sort`` and ``safety`` are registered in ptlight's ``pyproject.toml`` like any third
party's. A task is any object (a module, a class or an instance) that provides
``make_rows(kind, n, seed, split)`` and ``gold_reward(prompt, completion) -> float`` (prompt =
the user turn's text); optionally ``gold_metrics(samples) -> dict[str, float]``, extra metrics
of the gold evaluation over its scored samples (``prompt``, ``completion``, ``reward``), e.g.
the safety task's refusal rates; and ``reference_answer(prompt) -> str``, the answer the
acceptance metric measures edit distance to. ``python -m ptlight.tasks`` lists them.
"""

from __future__ import annotations

from typing import Any

from ptlight.registry import TASKS

GROUP = TASKS.group


def available_tasks() -> dict[str, str]:
    """Task name -> ``"module:attr"`` of its entry point (group ``ptlight.tasks``)."""
    return TASKS.available()


def get_task(name: str) -> Any:
    """The task registered under ``name``; ``KeyError`` lists the installed tasks."""
    return TASKS.load(name)
