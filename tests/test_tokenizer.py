"""The bundled lfm2-tiny tokenizer (scripts/build_tokenizer.py): byte-level, so any UTF-8 text
round-trips; every piece of the bundled tasks' text is one token; common English is compact;
special tokens and the chat template are LFM2's."""

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ptlight.model.backbone import BUNDLED_TOKENIZER
from ptlight.tasks import safety, sort

REPO = Path(__file__).resolve().parents[1]
# Common English words (most frequent few hundred of running text, plus longer everyday words).
COMMON = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first been call who its now find long down day did get come made may part government "
    "company school family student country problem question system program business children "
    "information important example development different national community something "
    "political because between through without another however position service president "
    "history public social million local money water father mother office market research "
    "health education experience possible weather morning evening language understand "
    "remember together university hospital building question answer letter sentence order"
).split()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _random_text(rng: random.Random, n: int) -> str:
    """Code points from every plane in use (no surrogates), control characters included."""
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.mark.parametrize("text", [
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, Ærøskøbing",
    "東京都の天気は晴れです。한국어 텍스트. 中文分词测试",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🧪🇯🇵 and symbols ∑∫√ ≠ ™ ©",
    "tab\there\nnew line\r\n  two spaces  \x00\x07 zero\u200bwidth ﬁ ligature",
    "Sort these words alphabetically: kiwi apple",
    "",
])
def test_any_utf8_text_round_trips(tok, text):
    ids = _ids(tok, text)
    assert tok.decode(ids) == text
    assert tok.unk_token is None and tok.unk_token_id is None


def test_random_code_points_round_trip_without_unknown_tokens(tok):
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng, rng.randint(1, 40))
        ids = _ids(tok, text)
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)


def _task_texts():
    texts = []
    for task, extra in ((sort, {"lazy_prob": 0.6}), (safety, {"comply_prob": 0.8})):
        for kind in ("sft", "pairwise", "unpaired", "listwise"):
            for split in ("train", "heldout"):
                for row in task.make_rows(kind, 200, 0, split,
                                          **(extra if kind == "sft" else {})):
                    texts += _contents(row)
    return texts


def _contents(value):
    if isinstance(value, dict):
        return [value["content"]] if "content" in value else [
            c for v in value.values() for c in _contents(v)]
    if isinstance(value, list):
        return [c for v in value for c in _contents(v)]
    return []


def test_every_piece_of_the_bundled_tasks_is_one_token(tok):
    """A word of sort or safety (with the leading space it has in the text, or none at the
    start of a turn), a contraction or a punctuation mark: one token each."""
    pre = tok.backend_tokenizer.pre_tokenizer
    texts = _task_texts()
    assert len(texts) > 1000
    for text in texts:
        pieces = [p for p, _ in pre.pre_tokenize_str(text)]
        assert len(_ids(tok, text)) == len(pieces), (text, tok.tokenize(text))
    for word in sort.WORDS:  # in a prompt after a space; any of them can start an answer
        assert len(_ids(tok, word)) == 1 and len(_ids(tok, " " + word)) == 1, word
    for word in ["Sort", " these", " words", " alphabetically", *(" " + v for v in safety.HARM_VERBS),
                 *(t.split()[0] for t in safety.TEMPLATES), "I", " can", "'t", " help"]:
        assert len(_ids(tok, word)) == 1, word
    for phrase in [*safety.PEOPLE, *(o for objs in safety.SAFE_VERBS.values() for o in objs),
                   *(o for objs in safety.HARMLESS_SENSES.values() for o in objs)]:
        assert len(_ids(tok, " " + phrase)) == len(phrase.split()), phrase
    for role in ("system", "user", "assistant"):
        assert len(_ids(tok, role)) == 1


def test_common_english_words_take_at_most_two_tokens(tok):
    assert len(_ids(tok, " government")) == 1
    assert len(_ids(tok, "government")) <= 2
    long = {w: tok.tokenize(" " + w) for w in COMMON if len(_ids(tok, " " + w)) > 2}
    assert not long
    sentence = "The government announced a new policy on education and health care this week."
    assert len(_ids(tok, sentence)) <= 1.5 * len(sentence.split())


def test_special_tokens_and_chat_template_are_lfm2s(tok):
    assert len(tok) >= 2048
    specials = ["<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>"]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == specials
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|startoftext|>",
                                                             "<|im_end|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 3
    assert (tok.model_max_length, tok.padding_side) == (2048, "right")
    assert tok.chat_template == (
        "{{- bos_token -}}{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\n"
        "' + message['content'] + '<|im_end|>' + '\n' -}}{%- endfor -%}{%- if "
        "add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
    messages = [{"role": "user", "content": "Sort these words alphabetically: kiwi apple"},
                {"role": "assistant", "content": "apple kiwi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|startoftext|><|im_start|>user\nSort these words alphabetically: kiwi apple"
                    "<|im_end|>\n<|im_start|>assistant\napple kiwi<|im_end|>\n")
    ids = _ids(tok, text)
    assert ids[:2] == [1, 3] and ids.count(2) == 2 and ids[-2] == 2
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_ptlight_does_not_import_the_build_time_word_list():
    """wordfreq is the build script's (extra ``tokenizer``), never a runtime dependency."""
    assert not [p for p in (REPO / "ptlight").rglob("*.py") if "wordfreq" in p.read_text()]
