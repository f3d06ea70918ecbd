"""Accepted data-set shapes, checked row by row and normalised to one canonical form.

| kind     | columns (TRL names)                                                         |
|----------|-----------------------------------------------------------------------------|
| sft      | ``prompt``+``completion`` / ``messages`` (last turn = completion) / ``text``   |
| pairwise | ``prompt``+``chosen``+``rejected``; or ``chosen``+``rejected`` sharing a prefix |

Every text field is either a string ("standard" data, used as-is) or a list of
``{"role", "content"}`` messages ("conversational" data, rendered with the chat template).
A row that does not fit raises :class:`BadRow` with the reason; the data module turns it
into an error naming the file and row, or drops and counts it (``data.on_bad_row=drop``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Text = str | list[dict[str, str]]


class BadRow(ValueError):
    """A row that cannot be used; the message says why in the user's terms."""


@dataclass
class Example:
    """One normalised row: a prompt and K completions (K=1 sft, K=2 pairwise: chosen first)."""

    prompt: Text
    completions: list[Text]


def _check_text(row: dict[str, Any], key: str, allow_empty: bool = False) -> Text:
    if key not in row or row[key] is None:
        raise BadRow(f"missing column {key!r}")
    value = row[key]
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise BadRow(f"column {key!r} is an empty string")
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        if not value and not allow_empty:
            raise BadRow(f"column {key!r} is an empty message list")
        if any(not m["content"].strip() for m in value) and not allow_empty:
            raise BadRow(f"column {key!r} has a message with empty content")
        return value
    raise BadRow(
        f"column {key!r} must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__}"
    )


def _split_messages(messages: Text, key: str) -> tuple[Text, Text]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise BadRow(f"column {key!r} needs at least a user turn and an assistant turn")
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"the last message of {key!r} must be the assistant's (the completion)")
    return messages[:-1], messages[-1:]


def _common_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Implicit prompt: the shared leading messages (or shared leading words) of the pair."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise BadRow("no 'prompt' column and chosen/rejected share no leading message")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        n = chosen.rfind(" ", 0, n + 1) if n < len(chosen) else n  # back off to a word boundary
        if n <= 0:
            raise BadRow("no 'prompt' column and chosen/rejected share no leading text")
        return chosen[:n], chosen[n:], rejected[n:]
    raise BadRow("chosen and rejected must both be strings or both be message lists")


def _same_format(prompt: Text, *completions: Text) -> None:
    if any(isinstance(c, list) != isinstance(prompt, list) for c in completions):
        raise BadRow("prompt and completions mix strings and message lists")


def parse_row(row: dict[str, Any], kind: str) -> Example:
    """Validate ``row`` as data of ``kind`` and normalise it; raises :class:`BadRow`."""
    if kind == "sft":
        if "messages" in row:
            prompt, completion = _split_messages(_check_text(row, "messages"), "messages")
        elif "text" in row and "completion" not in row:
            return Example(prompt="", completions=[_check_text(row, "text")])
        else:
            if "completion" not in row:
                raise BadRow(
                    f"sft data needs 'prompt'+'completion', 'messages' or 'text' columns; "
                    f"found {sorted(row)}"
                )
            prompt, completion = _check_text(row, "prompt"), _check_text(row, "completion")
        _same_format(prompt, completion)
        return Example(prompt=prompt, completions=[completion])
    if kind == "pairwise":
        if "chosen" not in row or "rejected" not in row:
            raise BadRow(f"pairwise data needs 'chosen' and 'rejected' columns; found {sorted(row)}")
        chosen, rejected = _check_text(row, "chosen"), _check_text(row, "rejected")
        if "prompt" in row:
            prompt = _check_text(row, "prompt")
        else:
            prompt, chosen, rejected = _common_prompt(chosen, rejected)
            if not chosen or not rejected:
                raise BadRow("after removing the shared prompt, chosen or rejected is empty")
        _same_format(prompt, chosen, rejected)
        if chosen == rejected:
            raise BadRow("chosen == rejected (the pair carries no preference)")
        return Example(prompt=prompt, completions=[chosen, rejected])
    raise ValueError(f"no row parser for data kind {kind!r} yet")
