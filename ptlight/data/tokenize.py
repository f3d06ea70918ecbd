"""Turn a normalised :class:`~ptlight.data.shapes.Example` into token ids with labels.

Conversational rows are rendered with the tokenizer's chat template; the completion is the
text the template adds after the generation prompt, so the labels are exactly the assistant's
tokens, closing EOS included (everything after the first EOS of the completion is cut: the
template's trailing newline is not a label). Standard (string) rows are used as-is, with EOS
appended to the completion.

Truncation policy (``data.truncation``), when prompt + longest completion > ``max_length``:
- ``keep_end`` (default, TRL's): drop tokens from the start of the prompt until it fits; if the
  prompt alone leaves no room, also cut completions at the end (their EOS is then lost).
  A prompt is never cut below ``min_prompt_tokens`` = 1 token.
- ``error``: the row is bad (error or dropped per ``data.on_bad_row``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptlight.data.shapes import BadRow, Example


@dataclass
class Encoded:
    """Token ids of one example: a shared prompt and K completions."""

    prompt: list[int]
    completions: list[list[int]]
    truncated: bool = False


def _render(tokenizer, example: Example) -> tuple[list[int], list[list[int]]]:
    eos = tokenizer.eos_token_id
    if isinstance(example.prompt, list):
        prompt_text = tokenizer.apply_chat_template(
            example.prompt, add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        completions = []
        for comp in example.completions:
            full = tokenizer.apply_chat_template(example.prompt + comp, tokenize=False)
            if not full.startswith(prompt_text):
                raise BadRow(
                    "the chat template renders prompt+completion so that it does not start with "
                    "the rendered prompt; cannot tell which tokens are the completion"
                )
            ids = tokenizer(full[len(prompt_text):], add_special_tokens=False).input_ids
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            completions.append(ids)
        return prompt_ids, completions
    prompt_ids = tokenizer(example.prompt).input_ids if example.prompt else []
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    completions = [
        tokenizer(c, add_special_tokens=False).input_ids + [eos] for c in example.completions
    ]
    return prompt_ids, completions


def encode(tokenizer, example: Example, max_length: int, truncation: str) -> Encoded:
    prompt, completions = _render(tokenizer, example)
    if not completions:  # prompt-only (PPO): the prompt alone must fit
        if len(prompt) <= max_length:
            return Encoded(prompt, [])
        if truncation == "error":
            raise BadRow(f"prompt ({len(prompt)} tokens) exceeds data.max_length={max_length} "
                         "(data.truncation=error)")
        return Encoded(prompt[-max_length:], [], truncated=True)
    if any(len(c) == 0 for c in completions):
        raise BadRow("a completion renders to zero tokens")
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return Encoded(prompt, completions)
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
    return Encoded(prompt, completions, truncated=True)
