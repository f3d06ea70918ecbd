"""Turn a normalised :class:`~ptlight.data.shapes.Example` into token ids with labels.

Conversational rows are rendered with the tokenizer's chat template; the completion is the
text the template adds after the generation prompt, so the labels are exactly the assistant's
tokens, closing EOS included (everything after the first EOS of the completion is cut: the
template's trailing newline is not a label). Standard (string) rows are used as-is, with EOS
appended to the completion.

Message content is text, never control tokens (as a chat UI treats what a user types): when a
message's content holds one of the tokenizer's special-token strings (``<|im_start|>system`` in
a user turn, ``<|im_end|>`` in an assistant turn), the template's own text is tokenized as
usual and each content is tokenized with ``split_special_tokens=True``, so a data row cannot
inject a turn and an assistant turn is never cut at an ``<|im_end|>`` it merely mentions. Such
examples are counted (``special_tokens_as_text`` in the data report). A chat template that
rewrites content (trims it, say) leaves no way to tell content from template, and such a row
is a bad row. String ("standard") rows are the user's own format: special-token strings in them
are tokens, as in TRL.

Long rows are cut in characters before they are tokenized, so one huge row costs memory in
proportion to ``max_length``, not to its size: a prompt longer than :func:`char_limit`
(2 x ``max_length`` x the longest token's characters) keeps its last that many characters, a
completion its first. Such a text has more than ``max_length`` tokens anyway, so the row is
truncated (counted) either way, and the tokens kept are the same unless a single word spans
more than half that many characters. With ``data.truncation=error`` such a row is a bad row.

Truncation policy (``data.truncation``), when prompt + longest completion > ``max_length``:
- ``keep_end`` (default, TRL's): drop tokens from the start of the prompt until it fits; if the
  prompt alone leaves no room, also cut completions at the end (their EOS is then lost).
  A prompt is never cut below ``min_prompt_tokens`` = 1 token.
- ``error``: the row is bad (error or dropped per ``data.on_bad_row``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ptlight.data.shapes import BadRow, Example

# What a message's content is replaced by while the template is rendered (private-use chars).
_SENTINEL = "\ue000ptl{}\ue001"
_SENTINEL_RE = re.compile("\ue000ptl(\\d+)\ue001")

Segments = list[tuple[str, bool]]  # (text, is message content) in order


@dataclass
class Encoded:
    """Token ids of one example: a shared prompt and K completions."""

    prompt: list[int]
    completions: list[list[int]]
    truncated: bool = False
    special_as_text: bool = False  # message content held special-token strings (kept as text)


@functools.lru_cache(maxsize=8)
def special_strings(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special-token strings (``<|im_end|>``, ...)."""
    names = set(tokenizer.all_special_tokens)
    names |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return tuple(sorted(n for n in names if n))


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    return max(len(t) for t in tokenizer.get_vocab())


def char_limit(tokenizer, max_length: int) -> int:
    """Characters of a text kept before tokenizing: 2 x ``max_length`` x the longest token (in
    characters), comfortably more than ``max_length`` tokens can cover."""
    return 2 * max_length * _longest_token(tokenizer)


def _ids(tokenizer, segments: Segments) -> list[int]:
    ids: list[int] = []
    for text, content in segments:
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=content).input_ids
    return ids


def _cut(segments: Segments, limit: int, keep_end: bool) -> tuple[Segments, bool]:
    """At most ``limit`` characters of ``segments``: the last ones (``keep_end``) or the first."""
    if sum(len(text) for text, _ in segments) <= limit:
        return segments, False
    out: Segments = []
    left = limit
    for text, content in (reversed(segments) if keep_end else segments):
        if left <= 0:
            break
        piece = text[-left:] if keep_end else text[:left]
        out.append((piece, content))
        left -= len(piece)
    return (out[::-1] if keep_end else out), True


def _segments(text: str, contents: list[str] | None) -> Segments:
    if contents is None:
        return [(text, False)]
    parts = _SENTINEL_RE.split(text)  # template, index, template, index, ..., template
    return [(contents[int(part)], True) if i % 2 else (part, False)
            for i, part in enumerate(parts)]


def _chat(tokenizer, example: Example) -> tuple[Segments, list[Segments], bool]:
    """The rendered prompt (with the generation prompt) and each completion's rendered text."""
    specials = special_strings(tokenizer)
    as_text = any(s in m["content"] for turn in (example.prompt, *example.completions)
                  for m in turn for s in specials)
    contents: list[str] | None = None
    turns = [example.prompt, *example.completions]
    if as_text:
        contents = []
        masked = []
        for turn in turns:
            masked.append([{**m, "content": _SENTINEL.format(len(contents))} for m in turn])
            contents.extend(m["content"] for m in turn)
        turns = masked

    def render(messages: list, generation: bool, real: list) -> str:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                             tokenize=False)
        if contents is not None and _SENTINEL_RE.sub(lambda m: contents[int(m.group(1))], text) \
                != tokenizer.apply_chat_template(real, add_generation_prompt=generation,
                                                 tokenize=False):
            raise BadRow(
                "a message's content holds a special-token string (one of "
                f"{', '.join(specials)}) and the chat template rewrites content, so it cannot be "
                "kept as plain text; remove the special-token string from the row"
            )
        return text

    prompt_text = render(turns[0], True, example.prompt)
    completions = []
    for comp, real in zip(turns[1:], example.completions):
        full = render(turns[0] + comp, False, example.prompt + real)
        if not full.startswith(prompt_text):
            raise BadRow(
                "the chat template renders prompt+completion so that it does not start with "
                "the rendered prompt; cannot tell which tokens are the completion"
            )
        completions.append(_segments(full[len(prompt_text):], contents))
    return _segments(prompt_text, contents), completions, as_text


def _render(tokenizer, example: Example,
            limit: int) -> tuple[list[int], list[list[int]], bool, bool]:
    """(prompt ids, completion ids, whether text was cut to ``limit`` characters, whether
    message content held special-token strings)."""
    eos = tokenizer.eos_token_id
    if isinstance(example.prompt, list):
        prompt_segs, comp_segs, as_text = _chat(tokenizer, example)
        prompt_segs, cut = _cut(prompt_segs, limit, keep_end=True)
        completions = []
        for segs in comp_segs:
            segs, cut_here = _cut(segs, limit, keep_end=False)
            cut |= cut_here
            ids = _ids(tokenizer, segs)
            if eos in ids:  # the template's end of turn: what follows it is not a label
                ids = ids[: ids.index(eos) + 1]
            completions.append(ids)
        return _ids(tokenizer, prompt_segs), completions, cut, as_text
    cut = len(example.prompt) > limit or any(len(c) > limit for c in example.completions)
    prompt_text = example.prompt[-limit:]
    prompt_ids = tokenizer(prompt_text).input_ids if prompt_text else []
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    completions = [
        tokenizer(c[:limit], add_special_tokens=False).input_ids + [eos]
        for c in example.completions
    ]
    return prompt_ids, completions, cut, False


def encode(tokenizer, example: Example, max_length: int, truncation: str) -> Encoded:
    prompt, completions, cut, as_text = _render(tokenizer, example,
                                                char_limit(tokenizer, max_length))
    if cut and truncation == "error":
        raise BadRow(f"a text of this row is longer than {char_limit(tokenizer, max_length):,} "
                     f"characters, more than data.max_length={max_length} tokens can hold "
                     "(data.truncation=error)")
    if not completions:  # prompt-only (PPO): the prompt alone must fit
        if len(prompt) <= max_length:
            return Encoded(prompt, [], special_as_text=as_text)
        if truncation == "error":
            raise BadRow(f"prompt ({len(prompt)} tokens) exceeds data.max_length={max_length} "
                         "(data.truncation=error)")
        return Encoded(prompt[-max_length:], [], truncated=True, special_as_text=as_text)
    if any(len(c) == 0 for c in completions):
        raise BadRow("a completion renders to zero tokens")
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return Encoded(prompt, completions, special_as_text=as_text)
    if truncation == "error":
        raise BadRow(
            f"prompt ({len(prompt)} tokens) + completion ({longest} tokens) exceeds "
            f"data.max_length={max_length} (data.truncation=error)"
        )
    keep = max(1, max_length - longest)
    prompt = prompt[-keep:]
    room = max_length - len(prompt)
    completions = [c[:room] for c in completions]
    if any(len(c) == 0 for c in completions):
        raise BadRow(f"no room left for the completion within data.max_length={max_length}")
    return Encoded(prompt, completions, truncated=True, special_as_text=as_text)
