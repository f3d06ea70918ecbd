"""Reverse the order of a list of words: ``Reverse the order of these words: red fox runs``
-> ``runs fox red``.

The SFT demonstrations come from a hurried annotator who, on lists of six words or more,
often stops a word or two early (:func:`demonstration`); preference pairs rank the complete
answer over a near miss (:func:`near_miss`). A model imitating the demonstrations learns to
stop early; comparisons teach it not to. Train and held-out lists never share a word set
(split by a hash of the set).
"""

from __future__ import annotations

import random
import zlib
from typing import Any

WORDS = (
    "red blue green black white small large quick slow happy river mountain forest ocean "
    "city garden window door table chair paper music story letter friend family child "
    "teacher doctor market road bridge field winter summer morning evening light shadow "
    "stone glass silver golden gentle bright quiet simple"
).split()
INSTRUCTION = "Reverse the order of these words:"
HELDOUT_BUCKETS = 8
kinds = ("sft", "pairwise", "prompt")


def _is_heldout(words: list[str]) -> bool:
    return zlib.crc32(" ".join(sorted(words)).encode()) % HELDOUT_BUCKETS == 0


def sample_lists(n: int, seed: int, split: str, min_words: int = 3, max_words: int = 8
                 ) -> list[list[str]]:
    """``n`` distinct word lists of ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"reverse-{split}-{seed}")
    out: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for _ in range(n * 50):
        if len(out) == n:
            break
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        if tuple(words) in seen or _is_heldout(words) != (split == "heldout"):
            continue
        seen.add(tuple(words))
        out.append(words)
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct {split} lists; lower the count")
    return out


def prompt_text(words: list[str]) -> str:
    return f"{INSTRUCTION} {' '.join(words)}"


def answer_text(words: list[str]) -> str:
    return " ".join(reversed(words))


def words_from_prompt(prompt: str) -> list[str]:
    if INSTRUCTION not in prompt:
        raise ValueError(f"not a reversal prompt: {prompt[:80]!r}")
    return prompt.split(INSTRUCTION, 1)[1].split()


def reference_answer(prompt: str) -> str:
    return answer_text(words_from_prompt(prompt))


def gold_reward(prompt: str, completion: str) -> float:
    """Fraction of positions of the reversed list the completion gets right (extra or missing
    words cost credit); 1.0 iff the completion is exactly the reversed list."""
    target = list(reversed(words_from_prompt(prompt)))
    got = completion.split()
    return sum(a == b for a, b in zip(got, target)) / max(len(got), len(target))


def near_miss(words: list[str], rng: random.Random) -> str:
    """The reversed list with one small corruption (stops early, a swap, a drop, the original
    order, or a repeat)."""
    out = list(reversed(words))
    kind = rng.choice(("truncate", "truncate", "swap", "drop", "original", "repeat"))
    if kind == "truncate":
        out = out[: rng.randint(max(1, len(out) - 3), len(out) - 1)]
    elif kind == "swap":
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "drop":
        del out[rng.randrange(len(out))]
    elif kind == "original":
        out = list(words)
    else:
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    return " ".join(out)


def demonstration(words: list[str], rng: random.Random, lazy_prob: float = 0.6,
                  lazy_from: int = 6) -> str:
    """What the hurried annotator writes: on long lists, often one or two words short."""
    target = list(reversed(words))
    if len(target) >= lazy_from and rng.random() < lazy_prob:
        target = target[: len(target) - rng.randint(1, 2)]
    return " ".join(target)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def make_rows(kind: str, n: int, seed: int, split: str, *, lazy_prob: float = 0.6,
              **kw: Any) -> list[dict[str, Any]]:
    """Rows of shape ``kind`` (``sft``, ``pairwise`` or ``prompt``) in conversational form;
    train-split SFT demonstrations are the hurried annotator's, everything else is correct."""
    lists = sample_lists(n, seed, split, **kw)
    rng = random.Random(f"reverse-rows-{kind}-{split}-{seed}")
    if kind == "sft":
        lazy = lazy_prob if split == "train" else 0.0
        return [{"prompt": _user(prompt_text(w)),
                 "completion": _assistant(demonstration(w, rng, lazy))} for w in lists]
    if kind == "pairwise":
        return [{"prompt": _user(prompt_text(w)), "chosen": _assistant(answer_text(w)),
                 "rejected": _assistant(near_miss(w, rng))} for w in lists]
    if kind == "prompt":
        return [{"prompt": _user(prompt_text(w))} for w in lists]
    raise ValueError(f"the reverse task has no data shape {kind!r}; use one of {kinds}")
