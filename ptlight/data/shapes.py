"""Accepted data-set shapes, checked row by row and normalised to one canonical form.

| kind     | columns (TRL names)                                                         |
|----------|-----------------------------------------------------------------------------|
| sft      | ``prompt``+``completion`` / ``messages`` (last turn = completion) / ``text``   |
| pairwise | ``prompt``+``chosen``+``rejected``; or ``chosen``+``rejected`` sharing a prefix |
| unpaired | ``prompt``+``completion``+``label`` (bool, True = desirable); or a pairwise row |
| listwise | ``prompt``+``completions`` (list, K >= 2) + ``ranks`` (1 = best) or ``scores``  |
| prompt   | ``prompt`` (PPO rollouts; other columns are ignored)                        |

Pairwise rows may carry a ``margin`` column (a finite number, reward-model training: the
Bradley–Terry margin m (docs/objectives.md, reward_bt; TRL's ``margin``); other methods ignore it.

Unpaired data (KTO) also accepts pairwise rows: :func:`parse_examples` turns one
``chosen``/``rejected`` row into TWO examples, the chosen completion labelled True and the
rejected one False (TRL's ``unpair_preference_dataset``); ``parse_row`` handles one-example rows.

Listwise rows are normalised so that the completions are ordered best first (stable: ties keep
their order) and :attr:`Example.scores` holds the matching ratings, higher = better: the given
``scores``, or ``-rank`` when ``ranks`` are given (so tied ranks stay tied for rank-aware
objectives; min/max-normalised, untied ranks 1..K give the labels (K - r)/(K - 1)). Giving
both ``ranks`` and ``scores`` is an error (they could disagree). Identical completions with
different ratings are a bad row. Every listwise row of a split must have the same K, which the
data module checks (a batch is ``[B, K]``).

Every text field is either a string ("standard" data, used as-is) or a list of
``{"role", "content"}`` messages ("conversational" data, rendered with the chat template); a
message's role is one of :data:`ROLES` and its content a string.
A row that does not fit raises :class:`BadRow` with the reason; the data module turns it
into an error naming the file and row, or drops and counts it (``data.on_bad_row=drop``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Text = str | list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")  # the roles of a message (HF chat templates)


class BadRow(ValueError):
    """A row that cannot be used; the message says why in the user's terms."""


@dataclass
class Example:
    """One normalised example: a prompt and K completions.

    completions: K=1 sft and unpaired, K=2 pairwise (chosen first), K>=2 listwise (best first).
    label:       unpaired only: True = desirable, False = undesirable.
    scores:      listwise only: ``[K]`` ratings aligned with ``completions`` (non-increasing,
                 ties allowed), higher = better.
    """

    prompt: Text
    completions: list[Text]
    label: bool | None = None
    scores: list[float] | None = None
    margin: float | None = None


def _present(row: dict[str, Any]) -> list[str]:
    """The columns this row has a value in (``datasets`` fills a column some other row has with
    None, so a misspelt column shows up as None everywhere else)."""
    return sorted(k for k, v in row.items() if v is not None)


def _check_text(row: dict[str, Any], key: str, allow_empty: bool = False) -> Text:
    if key not in row or row[key] is None:
        raise BadRow(f"missing column {key!r} (this row has {_present(row)})")
    return _check_value(row[key], key, allow_empty)


def _check_value(value: Any, key: str, allow_empty: bool = False) -> Text:
    """``value`` as a string or a list of messages; ``key`` names it in the error."""
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise BadRow(f"column {key!r} is an empty string")
        return value
    if isinstance(value, list):
        _check_messages(value, key)
        if not value and not allow_empty:
            raise BadRow(f"column {key!r} is an empty message list")
        if any(not m["content"].strip() for m in value) and not allow_empty:
            raise BadRow(f"column {key!r} has a message with empty content")
        return value
    raise BadRow(
        f"column {key!r} must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__}"
    )


def _check_messages(messages: list, key: str) -> None:
    """Each message is ``{"role": one of ROLES, "content": str}`` (other keys are ignored)."""
    for i, m in enumerate(messages):
        where = f"column {key!r}, message {i}"
        if not isinstance(m, dict):
            raise BadRow(f"{where} is a {type(m).__name__}, not a {{'role', 'content'}} object")
        if m.get("content") is None:
            keys = sorted(k for k in m if m[k] is not None)
            raise BadRow(f"{where} has no 'content' (it has {keys})")
        if not isinstance(m["content"], str):
            raise BadRow(f"{where}: 'content' must be a string, got {type(m['content']).__name__}")
        if m.get("role") not in ROLES:
            raise BadRow(f"{where} has role {m.get('role')!r}; the roles chat templates know are "
                         f"{', '.join(ROLES)}")


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


def _parse_sft(row: dict[str, Any]) -> Example:
    if "messages" in row:
        prompt, completion = _split_messages(_check_text(row, "messages"), "messages")
    elif "text" in row and "completion" not in row:
        return Example(prompt="", completions=[_check_text(row, "text")])
    else:
        if "completion" not in row:
            raise BadRow(
                f"sft data needs 'prompt'+'completion', 'messages' or 'text' columns; "
                f"found {_present(row)}"
            )
        prompt, completion = _check_text(row, "prompt"), _check_text(row, "completion")
    _same_format(prompt, completion)
    return Example(prompt=prompt, completions=[completion])


def _parse_pairwise(row: dict[str, Any]) -> Example:
    if "chosen" not in row or "rejected" not in row:
        raise BadRow(f"pairwise data needs 'chosen' and 'rejected' columns; found {_present(row)}")
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
    margin = _number(row["margin"], "margin", 0, False) if row.get("margin") is not None else None
    return Example(prompt=prompt, completions=[chosen, rejected], margin=margin)


def _parse_prompt(row: dict[str, Any]) -> Example:
    if "prompt" not in row and "messages" in row:
        raise BadRow("prompt-only data (PPO) needs a 'prompt' column; found 'messages' "
                     "(rename it to 'prompt', without the assistant's answer)")
    prompt = _check_text(row, "prompt")
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise BadRow("the prompt's last message is the assistant's; PPO generates that turn")
    return Example(prompt=prompt, completions=[])


def _check_label(row: dict[str, Any]) -> bool:
    if "label" not in row or row["label"] is None:
        raise BadRow("missing column 'label' (true = desirable completion, false = undesirable)")
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRow(f"column 'label' must be a boolean (true/false or 1/0), got {value!r}")


def _parse_unpaired(row: dict[str, Any]) -> Example:
    if "completion" not in row:
        raise BadRow(
            "unpaired data needs 'prompt'+'completion'+'label' columns (or 'chosen'+'rejected', "
            f"which give one desirable and one undesirable example); found {_present(row)}"
        )
    prompt, completion = _check_text(row, "prompt"), _check_text(row, "completion")
    _same_format(prompt, completion)
    return Example(prompt=prompt, completions=[completion], label=_check_label(row))


def _number(value: Any, key: str, i: int, integer: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer() and value >= 1
    if not ok:
        what = "an integer >= 1 (1 = best)" if integer else "a finite number"
        raise BadRow(f"{key}[{i}] must be {what}, got {value!r}")
    return float(value)


def _listwise_scores(row: dict[str, Any], k: int) -> list[float]:
    """Ratings aligned with ``completions``, higher = better: ``scores``, or ``-ranks``."""
    given = [key for key in ("ranks", "scores") if row.get(key) is not None]
    if not given:
        raise BadRow(
            "listwise data needs a 'ranks' (1 = best) or a 'scores' (higher = better) column"
        )
    if len(given) == 2:
        raise BadRow("give 'ranks' or 'scores', not both (they could disagree)")
    key = given[0]
    values = row[key]
    if not isinstance(values, list) or len(values) != k:
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise BadRow(f"column {key!r} has {n} entries but 'completions' has {k}")
    numbers = [_number(v, key, i, integer=key == "ranks") for i, v in enumerate(values)]
    return [-r for r in numbers] if key == "ranks" else numbers


def _parse_listwise(row: dict[str, Any]) -> Example:
    if not isinstance(row.get("completions"), list):
        raise BadRow(f"listwise data needs a 'completions' list column; found {_present(row)}")
    if len(row["completions"]) < 2:
        raise BadRow(f"'completions' needs at least 2 completions, got {len(row['completions'])}")
    prompt = _check_text(row, "prompt")
    completions = [_check_value(c, f"completions[{i}]") for i, c in enumerate(row["completions"])]
    _same_format(prompt, *completions)
    scores = _listwise_scores(row, len(completions))
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if completions[i] == completions[j] and scores[i] != scores[j]:
                raise BadRow(f"completions {i} and {j} are identical but rated differently")
    order = sorted(range(len(completions)), key=lambda i: -scores[i])  # stable: ties keep order
    return Example(prompt=prompt, completions=[completions[i] for i in order],
                   scores=[scores[i] for i in order])


_PARSERS = {
    "sft": _parse_sft,
    "pairwise": _parse_pairwise,
    "unpaired": _parse_unpaired,
    "listwise": _parse_listwise,
    "prompt": _parse_prompt,
}


def parse_row(row: dict[str, Any], kind: str) -> Example:
    """Validate ``row`` as one example of ``kind`` and normalise it; raises :class:`BadRow`.

    For unpaired data given as pairs (one row, two examples) use :func:`parse_examples`.
    """
    if kind not in _PARSERS:
        raise ValueError(f"no row parser for data kind {kind!r}; known: {sorted(_PARSERS)}")
    return _PARSERS[kind](row)


def parse_examples(row: dict[str, Any], kind: str) -> list[Example]:
    """Every example of one row: ``[parse_row(row, kind)]``, except unpaired data given as a
    pair (``chosen``/``rejected``, no ``completion``): the chosen completion labelled True and
    the rejected one labelled False, sharing the (explicit or implicit) prompt."""
    if kind == "unpaired" and "completion" not in row and ("chosen" in row or "rejected" in row):
        pair = _parse_pairwise(row)
        return [Example(pair.prompt, [pair.completions[0]], label=True),
                Example(pair.prompt, [pair.completions[1]], label=False)]
    return [parse_row(row, kind)]
