"""The bundled sorting task: gold reward, near misses, held-out split, imperfect demos."""

import random

from ptlight.tasks import sort


def test_gold_reward_is_one_only_for_the_sorted_list():
    prompt = sort.prompt_text(["kiwi", "apple", "fig"])
    assert sort.gold_reward(prompt, "apple fig kiwi") == 1.0
    assert sort.gold_reward(prompt, "apple kiwi fig") == 1 / 3
    assert sort.gold_reward(prompt, "apple fig") == 2 / 3
    assert sort.gold_reward(prompt, "apple fig kiwi kiwi") == 3 / 4
    assert sort.gold_reward(prompt, "") == 0.0


def test_near_misses_are_always_wrong_but_close():
    rng = random.Random(0)
    for words in sort.sample_lists(300, seed=3, split="train"):
        miss = sort.near_miss(words, rng)
        reward = sort.gold_reward(sort.prompt_text(words), miss)
        assert miss != sort.answer_text(words) and 0.0 <= reward < 1.0


def test_train_and_heldout_lists_never_overlap():
    train = {tuple(sorted(w)) for w in sort.sample_lists(2000, seed=0, split="train")}
    held = {tuple(sorted(w)) for w in sort.sample_lists(200, seed=1234, split="heldout")}
    assert not train & held


def test_lazy_demonstrations_only_in_train_sft_rows():
    rows = sort.make_rows("sft", 400, 0, "train", lazy_prob=1.0, lazy_from=6)
    short = [r for r in rows if len(r["completion"][0]["content"].split())
             < len(sort.words_from_prompt(r["prompt"][0]["content"]))]
    long_lists = [r for r in rows if len(sort.words_from_prompt(r["prompt"][0]["content"])) >= 6]
    assert len(short) == len(long_lists) > 0
    held = sort.make_rows("sft", 100, 0, "heldout", lazy_prob=1.0)
    assert all(sort.gold_reward(r["prompt"][0]["content"], r["completion"][0]["content"]) == 1.0
               for r in held)
    pairs = sort.make_rows("pairwise", 100, 0, "train", lazy_prob=1.0)
    assert all(sort.gold_reward(r["prompt"][0]["content"], r["chosen"][0]["content"]) == 1.0
               for r in pairs)
