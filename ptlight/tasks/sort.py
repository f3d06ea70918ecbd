"""The bundled task: sort a list of words alphabetically.

A user turn asks ``Sort these words alphabetically: kiwi plum apple``; the ideal answer is
``apple kiwi plum``. The gold reward is programmatic (:func:`gold_reward`): the fraction of
answer positions that hold the right word, so it is 1.0 exactly when the answer is correct and
gives partial credit for near misses.

Why SFT stays imperfect and preferences help: the SFT demonstrations are written by a hurried
annotator (:func:`demonstration`): on long lists (``lazy_from`` = 6+ words) they often stop one
or two words early (``lazy_prob``, 0.6 in ``conf/data/sort.yaml``). A model trained to imitate
them learns to stop early on long lists. Preference pairs rank the complete, correct answer
over a near miss (:func:`near_miss`: truncated, a word dropped, repeated, replaced or inserted,
or two neighbours swapped) — the comparison is easy even where writing the answer is tedious,
which is the classic argument for learning from comparisons. Held-out evaluation always uses
correct answers. Set ``data.task_args.lazy_prob=0`` for perfect demonstrations.

Train and held-out examples are split by a hash of the (sorted) word list, so the two never
share a list whatever seeds generate them; ``seed`` only picks which lists are drawn.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

WORDS = (
    "apple bear cat dog eagle fig goat hat ice jam kiwi lamp moon nut owl pear queen rose sun "
    "tree umbrella vase wolf yak zebra bread cloud drum egg fox grape honey iron juice kite lime "
    "mango nest orange piano quilt rice sand tiger violin water yarn zinc"
).split()
INSTRUCTION = "Sort these words alphabetically:"
HELDOUT_BUCKETS = 8  # 1 in 8 word lists is reserved for held-out evaluation


def _is_heldout(words: list[str]) -> bool:
    return zlib.crc32(" ".join(sorted(words)).encode()) % HELDOUT_BUCKETS == 0


def sample_lists(
    n: int, seed: int, split: str, min_words: int = 3, max_words: int = 8
) -> list[list[str]]:
    """``n`` distinct word lists (unsorted order) from ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"sort-{split}-{seed}")
    out: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for _ in range(n * 50):
        if len(out) == n:
            break
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        key = tuple(sorted(words))
        if key in seen or _is_heldout(words) != (split == "heldout"):
            continue
        seen.add(key)
        out.append(words)
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct {split} lists; lower the count")
    return out


def prompt_text(words: list[str]) -> str:
    return f"{INSTRUCTION} {' '.join(words)}"


def answer_text(words: list[str]) -> str:
    return " ".join(sorted(words))


def near_miss(words: list[str], rng: random.Random) -> str:
    """A plausible wrong answer: the sorted list with one small corruption."""
    target = sorted(words)
    out = list(target)
    kind = rng.choice(("swap", "drop", "repeat", "replace", "insert", "truncate", "truncate"))
    i = rng.randrange(len(out))
    if kind == "swap":
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "drop":
        del out[i]
    elif kind == "repeat":
        out.insert(i, out[i])
    elif kind == "truncate":  # stops early: the last one to three words are missing
        out = out[: rng.randint(max(1, len(out) - 3), len(out) - 1)]
    elif kind == "replace":
        out[i] = rng.choice([w for w in WORDS if w not in words])
    else:  # insert a word that is not in the list, in its alphabetical place
        out = sorted(out + [rng.choice([w for w in WORDS if w not in words])])
    return " ".join(out)


def words_from_prompt(prompt: str) -> list[str]:
    """Recover the word list from a prompt (the user turn text)."""
    if INSTRUCTION not in prompt:
        raise ValueError(f"not a sorting prompt: {prompt[:80]!r}")
    return prompt.split(INSTRUCTION, 1)[1].split()


def reference_answer(prompt: str) -> str:
    """The correct answer to a sorting prompt: the reference of the acceptance metric's edit
    distance (:mod:`ptlight.eval.acceptance`)."""
    return answer_text(words_from_prompt(prompt))


def gold_reward(prompt: str, completion: str) -> float:
    """Fraction of positions of the correct answer that the completion gets right.

    ``max(len(answer), len(target))`` is the denominator, so extra or missing words cost
    credit; 1.0 iff the completion (whitespace-split) equals the sorted list.
    """
    target = sorted(words_from_prompt(prompt))
    got = completion.split()
    hits = sum(a == b for a, b in zip(got, target))
    return hits / max(len(got), len(target))


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _unpaired_row(words: list[str], desirable: bool, rng: random.Random) -> dict[str, Any]:
    prompt = prompt_text(words)
    completion = answer_text(words) if desirable else near_miss(words, rng)
    return {"prompt": _user(prompt), "completion": _assistant(completion),
            "label": gold_reward(prompt, completion) == 1.0}


def _listwise_row(words: list[str], rng: random.Random, k: int = 4) -> dict[str, Any]:
    prompt = prompt_text(words)
    answers = [answer_text(words)]
    while len(answers) < k:  # distinct near misses; short lists still have > k of them
        miss = near_miss(words, rng)
        if miss not in answers:
            answers.append(miss)
    rng.shuffle(answers)
    return {"prompt": _user(prompt), "completions": [_assistant(a) for a in answers],
            "scores": [gold_reward(prompt, a) for a in answers]}


def demonstration(words: list[str], rng: random.Random, lazy_prob: float, lazy_from: int) -> str:
    """An SFT demonstration as a hurried annotator writes it.

    On lists of at least ``lazy_from`` words, with probability ``lazy_prob`` the annotator stops
    one or two words early. Such answers are easy to spot when two are compared side by side,
    which is what preference data adds over demonstrations.
    """
    target = sorted(words)
    if len(target) >= lazy_from and rng.random() < lazy_prob:
        target = target[: len(target) - rng.randint(1, 2)]
    return " ".join(target)


def check_args(args: dict[str, Any]) -> None:
    """``data.task_args``: ``lazy_prob`` in [0, 1], ``lazy_from`` >= 1, and
    1 <= ``min_words`` <= ``max_words`` <= the vocabulary's size."""
    from ptlight.tasks import check_generator_args

    check_generator_args(args, ("lazy_prob",), {"lazy_from": 1, "min_words": 1, "max_words": 1})
    lo, hi = args.get("min_words", 3), args.get("max_words", 8)
    if not lo <= hi <= len(WORDS):
        raise ValueError(f"min_words={lo}, max_words={hi}: need min_words <= max_words <= "
                         f"{len(WORDS)} (the words there are)")


def make_rows(
    kind: str, n: int, seed: int, split: str, *, lazy_prob: float = 0.0, lazy_from: int = 6,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Rows of data-set shape ``kind`` in conversational form: "sft", "pairwise",
    "unpaired" (balanced labels), "listwise" (K=4 with gold-reward scores) or "prompt".

    ``lazy_prob``/``lazy_from`` make train-split SFT demonstrations imperfect (see
    :func:`demonstration`); every other shape and split always carries correct answers.
    """
    lists = sample_lists(n, seed, split, **kw)
    rng = random.Random(f"sort-rows-{kind}-{split}-{seed}")
    if kind == "sft":
        lazy = lazy_prob if split == "train" else 0.0
        return [{"prompt": _user(prompt_text(w)),
                 "completion": _assistant(demonstration(w, rng, lazy, lazy_from))}
                for w in lists]
    if kind == "pairwise":
        return [
            {
                "prompt": _user(prompt_text(w)),
                "chosen": _assistant(answer_text(w)),
                "rejected": _assistant(near_miss(w, rng)),
            }
            for w in lists
        ]
    if kind == "unpaired":
        return [_unpaired_row(w, i % 2 == 0, rng) for i, w in enumerate(lists)]
    if kind == "listwise":
        return [_listwise_row(w, rng) for w in lists]
    if kind == "prompt":
        return [{"prompt": _user(prompt_text(w))} for w in lists]
    raise ValueError(
        f"sort task has no data shape {kind!r}; use sft, pairwise, unpaired, listwise or prompt"
    )
