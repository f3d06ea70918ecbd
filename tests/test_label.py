"""``python -m ptlight.label``: judges (reward plugins, the constitution LLM judge in both
orders), pairwise/listwise output that datasets and the DataModule read, the gold check, and
Self-Instruct prompt growth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from helpers import TINY, tiny_model_cfg

from ptlight.errors import ConfigError
from ptlight.eval.judges import (ConstitutionJudge, build_judge, load_constitution, pair_verdict)
from ptlight.tasks import sort

TINY_MODEL = [o for o in TINY if o.startswith("model.")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A saved (untrained) tiny LFM2 with the bundled tokenizer: a local HF model dir."""
    from ptlight.model.backbone import build_policy, load_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    tok = load_tokenizer(tiny_model_cfg())
    torch.manual_seed(0)
    build_policy(tiny_model_cfg(), tok).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ---- the constitution judge -------------------------------------------------------------------
@pytest.mark.parametrize("first_as_a, first_as_b, verdict", [
    (2.0, -1.0, "first"),    # A in order 1, B in order 2: the first completion both times
    (-2.0, 1.0, "second"),
    (2.0, 3.0, "tie"),       # always "A": pure position bias cancels to a tie
    (-2.0, -3.0, "tie"),     # always "B"
    (0.0, -1.0, "tie"),      # no preference in one order
])
def test_pair_verdict_needs_both_orders_to_agree(first_as_a, first_as_b, verdict):
    assert pair_verdict(first_as_a, first_as_b) == verdict


def test_constitution_file_is_checked_and_the_bundled_one_loads(tmp_path):
    c = load_constitution(Path(__file__).parents[1] / "conf" / "constitution" / "default.yaml")
    assert c.name == "helpful-harmless" and len(c.principles) >= 3
    text = c.render("How do I kill a process?", "one", "two", ("A", "B"))
    assert "1. " + c.principles[0] in text and "Answer A: one" in text and "Answer B: two" in text
    bad = tmp_path / "bad.yaml"
    for content, match in [("principles: []\n", "non-empty list"),
                           ("name: x\n", "non-empty list"),
                           ("principles: [a]\ncolour: red\n", "unknown key"),
                           ("- a\n- b\n", "mapping"),
                           ("principles: [a\n", "not valid YAML")]:
        bad.write_text(content)
        with pytest.raises(ConfigError, match=match) as err:
            load_constitution(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_constitution(tmp_path / "missing.yaml")


def _judge(tiny_dir: str) -> ConstitutionJudge:
    return build_judge({"name": "constitution", "path": tiny_dir}, torch.device("cpu"),
                       tiny_model_cfg())


def test_constitution_judge_cancels_position_bias_and_finds_a_consistent_winner(tiny_dir,
                                                                                monkeypatch):
    judge = _judge(tiny_dir)
    prompts = [[{"role": "user", "content": "How do I kill a process?"}]]
    groups = [["good answer", "bad", "also bad"]]
    # a judge that always answers "A": every pair disagrees with itself -> all ties
    monkeypatch.setattr(judge, "first_minus_second", lambda texts: [1.0] * len(texts))
    (j,) = judge.score_groups(prompts, groups)
    assert j.scores == [1.0, 1.0, 1.0]
    assert all(c["verdict"] == "tie" for c in j.details["comparisons"])
    assert len(j.details["comparisons"]) == 3

    # a judge that prefers the answer containing "good", whatever its position
    def content(texts):
        out = []
        for t in texts:
            a = t.split("Answer A: ")[1].split("\n")[0]
            b = t.split("Answer B: ")[1].split("\n")[0]
            out.append(float("good" in a) - float("good" in b))
        return out

    monkeypatch.setattr(judge, "first_minus_second", content)
    (j,) = judge.score_groups(prompts, groups)
    assert j.scores == [2.0, 0.5, 0.5]  # two wins; the two bad answers tie with each other


def test_constitution_judge_reads_real_logits_in_both_orders(tiny_dir):
    judge = _judge(tiny_dir)
    prompts = [[{"role": "user", "content": sort.prompt_text(["kiwi", "fig"])}]]
    (j,) = judge.score_groups(prompts, [["fig kiwi", "kiwi fig", "fig"]])
    assert sum(j.scores) == 3.0  # one point per pair, split on ties
    for c in j.details["comparisons"]:
        expected = pair_verdict(c["margin_ij"], c["margin_ji"])
        assert c["verdict"] == {"first": c["i"], "second": c["j"], "tie": "tie"}[expected]
    # the margins are logit(A) - logit(B) of the real model at the answer position
    text = judge.constitution.render(prompts[0][0]["content"], "fig kiwi", "kiwi fig", ("A", "B"))
    ids = torch.tensor([judge._encode(text)])
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits[0, -1]
    margin = (logits[judge.label_ids[0]] - logits[judge.label_ids[1]]).item()
    assert j.details["comparisons"][0]["margin_ij"] == pytest.approx(margin, abs=1e-3)
    meta = judge.metadata()
    assert meta["constitution"]["principles"] and meta["orders"].startswith("both")


def test_judge_config_mistakes_name_the_key(tiny_dir):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="judge.path is not set"):
        build_judge({"name": "constitution", "path": None}, cpu, tiny_model_cfg())
    with pytest.raises(ConfigError, match="judge.temperature"):
        build_judge({"name": "constitution", "path": tiny_dir, "temperature": 1}, cpu,
                    tiny_model_cfg())
    with pytest.raises(ConfigError, match="first tokens must differ"):
        build_judge({"name": "constitution", "path": tiny_dir, "labels": ["Yes", "Yet"]}, cpu,
                    tiny_model_cfg())
    with pytest.raises(ConfigError, match="judge.name"):
        build_judge({"name": "no_such_reward"}, cpu)
    for key, least in (("batch_size", 1), ("max_length", 2)):
        with pytest.raises(ConfigError, match=rf"judge\.{key}=0: .*write a whole number >= "
                                              rf"{least}"):
            build_judge({"name": "constitution", "path": tiny_dir, key: 0}, cpu,
                        tiny_model_cfg())


# ---- preference labelling ---------------------------------------------------------------------
def _fake_generate(monkeypatch):
    """Completions that depend on the prompt: the right answer, a near miss, garbage, and an
    exact copy of the right answer, for each prompt (N = 4)."""
    import ptlight.eval.gold as evaluate

    def fake(model, tokenizer, prompts, **kw):
        out = []
        for i, p in enumerate(prompts):
            words = sort.words_from_prompt(p[-1]["content"])
            out.append([sort.answer_text(words), " ".join(sorted(words)[:-1]), "zzz",
                        sort.answer_text(words)][i % 4])
        return out

    monkeypatch.setattr(evaluate, "generate", fake)


def _label_cfg(compose, *overrides):
    return compose(*TINY_MODEL, "label.num_prompts=12", "label.num_completions=4",
                   "label.max_new_tokens=8", *overrides)


@pytest.fixture
def compose_label():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ptlight.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda *o: compose(config_name="label", overrides=list(o))
    GlobalHydra.instance().clear()


def test_gold_judge_pairwise_rows_load_with_datasets_and_train_a_dpo_batch(compose_label,
                                                                          monkeypatch, tmp_path):
    from ptlight.model.backbone import load_tokenizer
    from ptlight.data.module import PtlDataModule
    from ptlight.label import run_label

    _fake_generate(monkeypatch)
    cfg = _label_cfg(compose_label)
    meta = run_label(cfg, tmp_path)
    rows = datasets.load_dataset("json", data_files=meta["output"], split="train").to_list()
    assert len(rows) == meta["rows"] == 12 and meta["skipped"] == {}
    for r in rows:
        words = sort.words_from_prompt(r["prompt"][0]["content"])
        assert r["chosen"] == [{"role": "assistant", "content": sort.answer_text(words)}]
        assert r["rejected"][0]["content"] == "zzz" and r["judge"] == "gold"
        assert r["chosen_score"] == 1.0 and r["rejected_score"] == 0.0
    saved = json.loads((tmp_path / "label.json").read_text())
    assert saved["judge"] == {"name": "gold", "kind": "reward",
                              "spec": {"name": "gold", "task": "sort"}}
    assert saved["gold_check"]["agreement"] == 1.0 and saved["num_completions"] == 4
    data = compose_label().data  # the same file through the training DataModule
    dm = PtlDataModule(type(data)({**data, "path": meta["output"], "val_size": 2}),
                       load_tokenizer(tiny_model_cfg()), "pairwise")
    dm.setup()
    assert dm.report()["train_rows"] + dm.report()["val_rows"] == 12


def test_listwise_output_keeps_all_completions_with_judge_scores(compose_label, monkeypatch,
                                                                 tmp_path):
    from ptlight.model.backbone import load_tokenizer
    from ptlight.data.module import PtlDataModule
    from ptlight.label import run_label

    _fake_generate(monkeypatch)
    meta = run_label(_label_cfg(compose_label, "label.format=listwise"), tmp_path)
    rows = [json.loads(line) for line in Path(meta["output"]).read_text().splitlines()]
    assert Path(meta["output"]).name == "listwise.jsonl"
    for r in rows:
        assert len(r["completions"]) == 4 and r["scores"][0] == r["scores"][3] == 1.0
        assert r["scores"][2] == 0.0
    # every strictly ordered pair agrees with gold (the judge is gold)
    assert meta["gold_check"]["agreement"] == 1.0
    assert meta["gold_check"]["num_pairs"] == 12 * 5  # 6 pairs, minus the tied copy
    data = compose_label().data
    dm = PtlDataModule(type(data)({**data, "path": meta["output"], "val_size": 2}),
                       load_tokenizer(tiny_model_cfg()), "listwise")
    dm.setup()
    assert dm.train[0].scores == sorted(dm.train[0].scores, reverse=True)


def test_a_judge_that_disagrees_with_gold_shows_in_the_gold_check(compose_label, monkeypatch,
                                                                   tmp_path):
    """A reward plugin that prefers shorter answers picks the near miss or garbage: the gold
    check must report disagreement, not agreement."""
    import ptlight.eval.judges as judges
    from ptlight.label import run_label
    from ptlight.rewards import Reward

    class Short(Reward):
        name = "short"

        def score(self, prompts, completions):
            return [-len(c) for c in completions]

    monkeypatch.setattr(judges, "build_reward", lambda spec, key: Short())
    _fake_generate(monkeypatch)
    meta = run_label(_label_cfg(compose_label, "judge.name=short", "~judge.task"), tmp_path)
    check = meta["gold_check"]
    assert check["disagreement"] == 1.0 and check["agreement"] == 0.0
    assert check["gold/chosen"] == 0.0 and check["gold/rejected"] == 1.0


def test_prompts_from_a_file_and_a_bad_row_names_file_and_row(compose_label, monkeypatch,
                                                              tmp_path):
    from ptlight.errors import DataError
    from ptlight.label import load_prompts

    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "hello there"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = compose_label(f"data.path={good}", "data.task=null")
    assert load_prompts(cfg, 10) == ["hello there", [{"role": "user", "content": "hi"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 1: missing column 'prompt'"):
        load_prompts(compose_label(f"data.path={bad}", "data.task=null"), 10)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "ptlight.label", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_config_mistakes_exit_2_with_one_line(tmp_path):
    proc = _cli(*TINY_MODEL, "label.format=ranked", f"hydra.run.dir={tmp_path / 'a'}",
                cwd=tmp_path)
    assert proc.returncode == 2 and "label.format='ranked'" in proc.stderr
    proc = _cli(*TINY_MODEL, "judge=constitution", f"hydra.run.dir={tmp_path / 'b'}",
                cwd=tmp_path)
    assert proc.returncode == 2 and "judge.path is not set" in proc.stderr


@pytest.mark.slow
def test_cli_constitution_judge_end_to_end(tiny_dir, tmp_path):
    """The real command: the tiny model samples and judges (mechanics, not quality)."""
    run = tmp_path / "run"
    proc = _cli(*TINY_MODEL, f"model.path={tiny_dir}", "judge=constitution",
                f"judge.path={tiny_dir}", "label.num_prompts=6", "label.num_completions=3",
                "label.max_new_tokens=6", "label.format=listwise", f"hydra.run.dir={run}",
                cwd=tmp_path)
    meta = json.loads((run / "label.json").read_text()) if (run / "label.json").exists() else None
    if proc.returncode == 2:  # every prompt tied: a legitimate outcome, reported as such
        assert "no preference rows" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert meta["judge"]["kind"] == "llm" and meta["judge"]["constitution"]["principles"]
    rows = datasets.load_dataset("json", data_files=str(run / "listwise.jsonl"),
                                 split="train").to_list()
    assert len(rows) == meta["rows"] > 0
    for r in rows:
        assert len(r["comparisons"]) == 3 and sum(r["scores"]) == 3.0


# ---- Self-Instruct --------------------------------------------------------------------------
def test_self_instruct_keeps_new_prompts_and_drops_duplicates_and_near_copies(compose_label,
                                                                              monkeypatch,
                                                                              tmp_path):
    import ptlight.eval.gold as evaluate
    from ptlight.label import run_label

    seeds = ["Sort these words alphabetically: kiwi fig apple",
             "Sort these words alphabetically: moon sun"]
    outputs = iter([
        "4. Sort these words alphabetically: kiwi fig apple",     # duplicate of a seed
        "Sort these words alphabetically: kiwi fig apple pear",   # near copy of a seed
        "Sort these words alphabetically: zebra owl nut tiger",   # new
        "hi",                                                     # too short
        "Sort these words alphabetically: zebra owl nut tiger",   # duplicate of a kept one
        "Reverse these words: cat dog eagle\nsecond line ignored",  # new (first line only)
    ])

    def fake(model, tokenizer, prompts, **kw):
        assert all("Here are some example requests" in p[0]["content"] for p in prompts)
        return [next(outputs) for _ in prompts]

    monkeypatch.setattr(evaluate, "generate", fake)
    cfg = compose_label(*TINY_MODEL, "label.mode=prompts", f"self_instruct.seeds={seeds}",
                        "self_instruct.batch_size=3", "self_instruct.num_new=2",
                        "self_instruct.max_rounds=5")
    meta = run_label(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["seed", "seed", "self_instruct", "self_instruct"]
    assert [r["prompt"][0]["content"] for r in rows[2:]] == [
        "Sort these words alphabetically: zebra owl nut tiger", "Reverse these words: cat dog eagle"]
    assert meta["candidates"] == {"duplicate": 2, "too similar": 1, "kept": 2, "length": 1}
    assert meta["rounds"] == 2 and meta["task_valid"] == 0.5  # the reverse prompt is not sort's


@pytest.mark.slow
def test_cli_self_instruct_with_a_real_policy_accounts_for_every_candidate(tmp_path):
    run = tmp_path / "run"
    proc = _cli(*TINY_MODEL, "label.mode=prompts", "self_instruct.num_seeds=4",
                "self_instruct.batch_size=4", "self_instruct.max_rounds=2",
                "label.max_new_tokens=8", "self_instruct.min_words=1", f"hydra.run.dir={run}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((run / "label.json").read_text())
    assert sum(meta["candidates"].values()) == 4 * meta["rounds"]
    rows = datasets.load_dataset("json", data_files=str(run / "prompts.jsonl"),
                                 split="train").to_list()
    assert len(rows) == 4 + meta["num_new"]


@pytest.mark.parametrize("overrides,message", [
    (["label.num_prompts=0"], r"label\.num_prompts=0: prompts to label; write a whole number >= 1"),
    (["label.max_new_tokens=0"], r"label\.max_new_tokens=0: tokens generated per completion"),
    (["label.batch_size=0"], r"label\.batch_size=0: prompts generated for at once"),
    (["label.mode=prompts", "label.batch_size=0"],
     r"label\.batch_size=0: requests generated for at once"),
])
def test_label_counts_are_checked_before_the_policy_loads(compose_label, monkeypatch, tmp_path,
                                                         overrides, message):
    import ptlight.model.backbone as backbone
    from ptlight.label import run_label

    monkeypatch.setattr(backbone, "build_policy", lambda *a, **k: pytest.fail("policy loaded"))
    with pytest.raises(ConfigError, match=message):
        run_label(_label_cfg(compose_label, *overrides), tmp_path)
