"""The bundled verifiable task: add two whole numbers.

A user turn asks ``What is 47 + 85?``; the answer is ``132``. Operands have ``min_digits`` to
``max_digits`` digits (1 to 2 by default, ``data.task_args``; they apply to the held-out
prompts too). The gold reward is a verifier
(:func:`gold_reward`): 1.0 exactly when the completion is the sum, else the fraction of the
sum's digits, aligned from the right (units with units), that the completion gets right, so a
near miss earns partial credit and a completion with no number earns 0.

Why SFT stays imperfect and RL from the verifier helps: the SFT demonstrations come from a
sloppy annotator (:func:`demonstration`) who, on sums that need a carry, forgets it with
probability ``forget_carry`` (0.5 in ``conf/data/arith.yaml``): ``47 + 385`` is written as
``322``, each column's digit sum mod 10 with the carries dropped. A model that imitates the
demonstrations learns both answers; sampling several completions per prompt and reinforcing
the ones the verifier accepts (GRPO and the rest of OBJECTIVES.md §12) moves the policy to the
correct one, which no demonstration-only method can do. Preference pairs (correct over the
carry-less answer, or over an off-by-one-digit answer when no carry is needed) let DPO do the
same from comparisons. Held-out evaluation always uses correct answers.

Train and held-out problems are split by a hash of the (unordered) operands, so a held-out
problem never appears in training in either order; ``seed`` only picks which are drawn.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Any

kinds = ("sft", "pairwise", "unpaired", "prompt")
HELDOUT_BUCKETS = 8  # 1 in 8 operand pairs is reserved for held-out evaluation
_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def _is_heldout(a: int, b: int) -> bool:
    lo, hi = sorted((a, b))
    return zlib.crc32(f"{lo}+{hi}".encode()) % HELDOUT_BUCKETS == 0


def sample_problems(n: int, seed: int, split: str, min_digits: int = 1, max_digits: int = 2
                    ) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs of ``split`` ("train" or "heldout"), each operand with
    ``min_digits`` to ``max_digits`` digits."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"arith: need 1 <= min_digits <= max_digits, got {min_digits}, "
                         f"{max_digits}")
    rng = random.Random(f"arith-{split}-{seed}")
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()

    def operand() -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

    for _ in range(n * 50):
        if len(out) == n:
            break
        a, b = operand(), operand()
        if (a, b) in seen or _is_heldout(a, b) != (split == "heldout"):
            continue
        seen.add((a, b))
        out.append((a, b))
    if len(out) < n:
        raise ValueError(f"arith: could not draw {n} distinct {split} problems with "
                         f"{min_digits}-{max_digits} digits; lower the count or widen the range")
    return out


def prompt_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def operands(prompt: str) -> tuple[int, int]:
    """The operands of a prompt (the user turn text)."""
    m = _PROMPT.search(prompt)
    if m is None:
        raise ValueError(f"not an arith prompt: {prompt[:80]!r}")
    return int(m.group(1)), int(m.group(2))


def needs_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def carryless_sum(a: int, b: int) -> int:
    """The sum with every carry forgotten: each column's digit sum mod 10."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def reference_answer(prompt: str) -> str:
    """The correct answer (the reference of the acceptance metric's edit distance)."""
    a, b = operands(prompt)
    return str(a + b)


def gold_reward(prompt: str, completion: str) -> float:
    """1.0 iff the completion's first number is the sum; otherwise the fraction of the sum's
    digits it gets right, aligned from the right, over ``max(len(answer), len(sum))`` digits
    (extra or missing digits cost credit). No number: 0.0."""
    target = reference_answer(prompt)
    m = _NUMBER.search(completion)
    if m is None:
        return 0.0
    got = m.group(0)
    if got == target:
        return 1.0
    hits = sum(x == y for x, y in zip(reversed(got), reversed(target)))
    return hits / max(len(got), len(target))


def demonstration(a: int, b: int, rng: random.Random, forget_carry: float) -> str:
    """An SFT demonstration as a sloppy annotator writes it: on a sum that needs a carry, the
    carry is forgotten with probability ``forget_carry``."""
    if needs_carry(a, b) and rng.random() < forget_carry:
        return str(carryless_sum(a, b))
    return str(a + b)


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer: the carry-less sum when a carry is needed, else the sum with
    one digit off by one."""
    if needs_carry(a, b):
        return str(carryless_sum(a, b))
    digits = list(str(a + b))
    i = rng.randrange(len(digits))
    d = int(digits[i])
    digits[i] = str(d + 1 if d < 9 else d - 1)
    if len(digits) > 1 and digits[0] == "0":
        digits[0] = "1"
    return "".join(digits)


def gold_metrics(samples: list[Any]) -> dict[str, float]:
    """``arith/carry_exact``: exact match on the held-out prompts whose sum needs a carry (the
    part the demonstrations get wrong); ``arith/carryless_rate``: share of those answered
    with the carry-less sum (the demonstrations' mistake). ``samples``: objects with
    ``prompt`` (user text) and ``completion``."""
    carry = [(operands(s.prompt), s.completion.strip()) for s in samples
             if needs_carry(*operands(s.prompt))]
    if not carry:
        return {}
    exact = sum(got == str(a + b) for (a, b), got in carry)
    slip = sum(got == str(carryless_sum(a, b)) for (a, b), got in carry)
    return {"arith/carry_exact": exact / len(carry), "arith/carryless_rate": slip / len(carry)}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def check_args(args: dict[str, Any]) -> None:
    """``data.task_args``: ``forget_carry`` in [0, 1] and 1 <= ``min_digits`` <=
    ``max_digits``."""
    from ptlight.tasks import check_generator_args

    check_generator_args(args, ("forget_carry",), {"min_digits": 1, "max_digits": 1})
    lo, hi = args.get("min_digits", 1), args.get("max_digits", 2)
    if lo > hi:
        raise ValueError(f"min_digits={lo} > max_digits={hi}")


def make_rows(
    kind: str, n: int, seed: int, split: str, *, forget_carry: float = 0.0,
    min_digits: int = 1, max_digits: int = 2,
) -> list[dict[str, Any]]:
    """Rows of data-set shape ``kind`` in conversational form: "sft", "pairwise", "unpaired"
    (balanced labels) or "prompt". ``forget_carry`` makes train-split SFT demonstrations
    imperfect (see :func:`demonstration`); every other shape and split carries correct answers.
    """
    problems = sample_problems(n, seed, split, min_digits, max_digits)
    rng = random.Random(f"arith-rows-{kind}-{split}-{seed}")
    if kind == "sft":
        slip = forget_carry if split == "train" else 0.0
        return [{"prompt": _user(prompt_text(a, b)),
                 "completion": _assistant(demonstration(a, b, rng, slip))} for a, b in problems]
    if kind == "pairwise":
        return [{"prompt": _user(prompt_text(a, b)), "chosen": _assistant(str(a + b)),
                 "rejected": _assistant(wrong_answer(a, b, rng))} for a, b in problems]
    if kind == "unpaired":
        rows = []
        for i, (a, b) in enumerate(problems):
            good = i % 2 == 0
            rows.append({"prompt": _user(prompt_text(a, b)),
                         "completion": _assistant(str(a + b) if good else wrong_answer(a, b, rng)),
                         "label": good})
        return rows
    if kind == "prompt":
        return [{"prompt": _user(prompt_text(a, b))} for a, b in problems]
    raise ValueError(f"arith task has no data shape {kind!r}; use sft, pairwise, unpaired or "
                     "prompt")
