"""Acceptance as a metric: how often a user would accept what the model says, and how much they
would have to edit it.

- :func:`edit_distance`: normalised Levenshtein distance in [0, 1] over words (``unit="word"``,
  whitespace-split) or characters: edits (insert, delete, substitute) divided by the longer
  sequence's length, so 0 is identical and 1 shares nothing position-wise. No dependency in
  ptlight's environment provides Levenshtein, so this is the textbook two-row dynamic program.
- :func:`acceptance_summary`: over scored generations, ``acceptance/rate`` (share with a
  score >= ``threshold``: the reward/judge plugin's score, or the task's gold reward), and
  ``acceptance/edit_distance`` (mean word-level :func:`edit_distance` of the generation to the
  reference answer, over the prompts that have one).
- :func:`read_heldout`: held-out prompts with optional ``reference`` answers from a file (the
  ``heldout.jsonl`` that ``python -m ptlight.feedback`` writes, or any ``prompt`` [+
  ``reference``] file).
- :func:`task_reference`: the reference answer of a bundled task's prompt, when the task module
  defines ``reference_answer(prompt) -> str``.

The win rate against the previous model is :func:`ptlight.eval.gold.win_rate` over the same
acceptance scores (``python -m ptlight.eval eval.baseline=<previous export>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptlight.errors import DataError


def _levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Edits (insert, delete, substitute; each cost 1) turning ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_distance(a: str, b: str, unit: str = "word") -> float:
    """Normalised Levenshtein distance of two texts in [0, 1] (module doc); two empty texts: 0."""
    if unit not in ("word", "char"):
        raise ValueError(f"edit_distance unit must be 'word' or 'char', got {unit!r}")
    x, y = (a.split(), b.split()) if unit == "word" else (a, b)
    longest = max(len(x), len(y))
    return _levenshtein(x, y) / longest if longest else 0.0


def acceptance_summary(scores: Sequence[float], completions: Sequence[str],
                       references: Sequence[str | None], threshold: float) -> dict[str, Any]:
    """``acceptance/rate``, ``acceptance/edit_distance`` (None when no prompt has a reference),
    ``acceptance/threshold`` and the counts, over one model's generations."""
    if not scores or not len(scores) == len(completions) == len(references):
        raise ValueError("acceptance_summary needs one score, completion and reference "
                         "(or None) per prompt")
    dists = [edit_distance(c, r) for c, r in zip(completions, references) if r is not None]
    return {"acceptance/rate": sum(s >= threshold for s in scores) / len(scores),
            "acceptance/edit_distance": sum(dists) / len(dists) if dists else None,
            "acceptance/threshold": threshold, "acceptance/num_prompts": len(scores),
            "acceptance/num_references": len(dists)}


def _text(value: Any) -> str:
    """A completion's text: a string, or the content of a message list's last turn."""
    return value[-1]["content"] if isinstance(value, list) else value


def read_heldout(path: str, limit: int) -> tuple[list[Any], list[str | None]]:
    """Prompts (strings or message lists) and reference answers (None where the row has none)
    of the first ``limit`` rows of ``path``; a bad row is a DataError naming it."""
    from ptlight.data.module import load_rows

    prompts: list[Any] = []
    references: list[str | None] = []
    for i, row in enumerate(load_rows(path, key="eval.acceptance.path")[:limit]):
        prompt, ref = row.get("prompt"), row.get("reference")
        if not prompt or not isinstance(prompt, (str, list)):
            raise DataError(f"{path}, row {i}: needs a 'prompt' (a string or a message list)")
        if ref is not None and not (isinstance(ref, (str, list)) and _text(ref).strip()):
            raise DataError(f"{path}, row {i}: 'reference' must be a non-empty string or "
                            "message list (or absent)")
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                       else prompt)
        references.append(None if ref is None else _text(ref))
    if not prompts:
        raise DataError(f"{path}: no held-out prompts")
    return prompts, references


def task_reference(task: Any, prompt: str) -> str | None:
    """The task's reference answer for ``prompt`` (user text), when the task defines one."""
    reference = getattr(task, "reference_answer", None)
    return reference(prompt) if reference else None
