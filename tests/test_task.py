"""The bundled sorting task: gold reward, near misses, held-out split, imperfect demos."""

import random

import pytest

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


@pytest.mark.parametrize("task,args,message", [
    ("sort", {"foo": 1}, r"data\.task_args for task 'sort': unknown argument\(s\) foo; this task "
                         r"takes lazy_from, lazy_prob, max_words, min_words"),
    ("sort", {"lazy_prob": "abc"}, r"lazy_prob='abc': a probability, a number in \[0, 1\]"),
    ("sort", {"lazy_from": -3}, r"lazy_from=-3: a whole number >= 1"),
    ("sort", {"max_words": 5000}, r"need min_words <= max_words <= 48"),
    ("arith", {"forget_carry": 2}, r"data\.task_args for task 'arith': forget_carry=2"),
    ("arith", {"min_digits": 5, "max_digits": 2}, r"min_digits=5 > max_digits=2"),
    ("safety", {"harmful_frac": 3}, r"data\.task_args for task 'safety': harmful_frac=3"),
])
def test_bad_task_args_are_config_errors_naming_the_task(task, args, message):
    from ptlight.errors import ConfigError
    from ptlight.tasks import resolve_task

    with pytest.raises(ConfigError, match=message):
        resolve_task(task, args=args)


def test_a_task_without_check_args_has_unknown_args_refused_from_its_signature(monkeypatch):
    import types

    from ptlight.errors import ConfigError
    from ptlight.tasks import resolve_task

    plugin = types.SimpleNamespace(
        make_rows=lambda kind, n, seed, split, *, noise=0.0: [],
        gold_reward=lambda prompt, completion: 0.0)
    monkeypatch.setattr("ptlight.tasks.get_task", lambda name: plugin)
    assert resolve_task("mine", args={"noise": 0.5}).args == {"noise": 0.5}
    with pytest.raises(ConfigError, match=r"task 'mine': unknown argument\(s\) nois; this task "
                                          r"takes noise"):
        resolve_task("mine", args={"nois": 0.5})
