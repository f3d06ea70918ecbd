"""Build the byte-level BPE tokenizer that ships with ptlight for the ``lfm2-tiny`` model.

    python scripts/build_tokenizer.py            # rewrites ptlight/assets/lfm2-tiny-tokenizer/

Byte-level, so any UTF-8 text tokenizes (no unknown token); merges are learned from the bundled
sorting task plus a little general English so that task words are single tokens. Special
tokens and the chat template follow LFM2's (``<|startoftext|>``, ``<|im_start|>``,
``<|im_end|>`` as EOS, a pad token distinct from EOS).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ptlight.tasks import sort

OUT = Path(__file__).resolve().parents[1] / "ptlight" / "assets" / "lfm2-tiny-tokenizer"
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>"]
# LFM2's template, minus tool calling: one line per turn, EOS (<|im_end|>) closes each turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
GENERAL = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first been call "
    "who its now find long down day did get come made may part user assistant system answer "
    "question please list words sort alphabetically order reverse count letters sentence"
)


def corpus() -> list[str]:
    texts = [GENERAL, " ".join(sort.WORDS), "user assistant system"]
    for split in ("train", "heldout"):
        for words in sort.sample_lists(2000 if split == "train" else 300, seed=0, split=split):
            texts.append(f"{sort.prompt_text(words)}\n{sort.answer_text(words)}")
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
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
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} (vocab {len(fast)})")
    print(json.dumps(fast.convert_ids_to_tokens(fast("Sort these words alphabetically: kiwi apple")["input_ids"])))


if __name__ == "__main__":
    main()
