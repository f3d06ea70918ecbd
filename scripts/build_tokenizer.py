"""Build the byte-level BPE tokenizer that ships with ptlight for the ``lfm2-tiny`` model.

    pip install -e ".[tokenizer]"                 # wordfreq: build time only, ptlight never imports it
    python scripts/build_tokenizer.py             # rewrites ptlight/assets/lfm2-tiny-tokenizer/
    python scripts/build_tokenizer.py --vocab-size 2048 --out /tmp/tok-2048   # a candidate

Byte-level (GPT-2 pre-tokenizer, no unknown token): any UTF-8 text tokenizes and decodes back
exactly. The merges are learned from

- general English: ``wordfreq``'s ``--top-n`` most frequent English words, each repeated in
  proportion to its frequency (``" word"`` as in running text, plus rarer ``" Word"``,
  ``"Word"`` and ``"word"`` for capitals and line starts), so common words are one or two
  tokens;
- the bundled tasks (``ptlight/tasks/sort.py``, ``ptlight/tasks/safety.py``): every
  pre-tokenized piece of their text (``" apple"``, ``"apple"``, ``" neighbour"``, ``"'t"``, ...)
  weighted like a very common word, so each is a single token. The build fails if one is not.

Special tokens, their ids (0-3) and the chat template follow LFM2's (``<|startoftext|>`` BOS,
``<|im_start|>``, ``<|im_end|>`` as EOS, a pad token distinct from EOS).
``scripts/tokenizer_report.py`` prints what the vocabulary size costs and buys.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ptlight.tasks import safety, sort

OUT = Path(__file__).resolve().parents[1] / "ptlight" / "assets" / "lfm2-tiny-tokenizer"
VOCAB_SIZE = 4096
TOP_N = 50_000
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>"]
# LFM2's template, minus tool calling: one line per turn, EOS (<|im_end|>) closes each turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
ROLES = ("system", "user", "assistant")
# Relative weight of each written form of a wordfreq word (wordfreq's words are lower case).
FORMS = ((lambda w: " " + w, 1.0), (lambda w: " " + w.capitalize(), 0.1),
         (lambda w: w.capitalize(), 0.1), (lambda w: w, 0.1))
TASK_FREQUENCY = 1e-3  # each bundled-task piece counts like a word of this frequency (top ~200)
PRE = pre_tokenizers.ByteLevel(add_prefix_space=False)


def _contents(value) -> list[str]:
    """The message contents anywhere in a row (messages, lists of conversations)."""
    if isinstance(value, dict):
        if "content" in value:
            return [value["content"]]
        return [c for v in value.values() for c in _contents(v)]
    if isinstance(value, list):
        return [c for v in value for c in _contents(v)]
    return []


def task_texts() -> list[str]:
    """Every message text of the bundled tasks' rows (all shapes, both splits), plus the roles."""
    texts: list[str] = list(ROLES)
    kinds = ("sft", "pairwise", "unpaired", "listwise", "prompt")
    for task, n, extra in ((sort, 2000, {"lazy_prob": 0.6}), (safety, 2000, {"comply_prob": 0.8})):
        for kind in kinds:
            for split in ("train", "heldout"):
                for row in task.make_rows(kind, n if split == "train" else 300, 0, split,
                                          **(extra if kind == "sft" else {})):
                    texts += _contents(row)
    texts += sort.WORDS + [" " + w for w in sort.WORDS]  # any word can start an answer
    texts += [safety.REFUSAL, *safety.STEPS]
    return texts


def task_pieces() -> list[str]:
    """The distinct pre-tokenized pieces (decoded text) of :func:`task_texts`, sorted."""
    dec = decoders.ByteLevel()
    return sorted({dec.decode([p]) for t in task_texts() for p, _ in PRE.pre_tokenize_str(t)})


def weighted_words(top_n: int) -> list[tuple[str, int]]:
    """(written form, count) for wordfreq's ``top_n`` English words: counts proportional to
    frequency, the rarest word's plain form counting 1."""
    import wordfreq  # build time only: pip install -e ".[tokenizer]"

    words = wordfreq.top_n_list("en", top_n)
    freqs = [wordfreq.word_frequency(w, "en") for w in words]
    scale = 1.0 / min(freqs)
    out: dict[str, int] = {}
    for w, f in zip(words, freqs):
        for form, weight in FORMS:
            n = round(f * weight * scale)
            if n:
                out[form(w)] = out.get(form(w), 0) + n
    task_count = round(TASK_FREQUENCY * scale)
    for piece in task_pieces():
        out[piece] = max(out.get(piece, 0), task_count)
    return sorted(out.items())


def corpus(top_n: int) -> Iterator[str]:
    """Each written form ``count`` times, one a line, in chunks (the trainer counts words)."""
    for text, count in weighted_words(top_n):
        while count > 0:
            k = min(count, 10_000)
            yield "\n".join([text] * k)
            count -= k


def build(vocab_size: int, top_n: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(top_n), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    split = [p for p in task_pieces() if len(fast(p, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise SystemExit(f"bundled-task pieces that are not one token at vocab {vocab_size}: "
                         f"{split[:20]}; raise TASK_FREQUENCY or the vocabulary size")
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--top-n", type=int, default=TOP_N, help="wordfreq English words learned from")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    fast = build(args.vocab_size, args.top_n)
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    print(f"wrote {args.out} (vocab {len(fast)})")
    for text in ("Sort these words alphabetically: kiwi apple",
                 "The government announced a new policy on Tuesday."):
        print(json.dumps(fast.convert_ids_to_tokens(fast(text)["input_ids"])))


if __name__ == "__main__":
    main()
