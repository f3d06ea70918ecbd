"""Bring your own task: a task made of files (held-out prompts + reward plugins) evaluates like
a bundled one; no bundled task is ever scored on someone else's data; ``python -m ptlight.eval``
evaluates the untrained start; bad task input is a clear error."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from helpers import TINY
from ptlight import registry
from ptlight.errors import ConfigError, DataError, PluginError
from ptlight.rewards import Reward
from ptlight.tasks import resolve_task, sort, task_label

ROWS = [("b a", "a b"), ("kiwi apple fig", "apple fig kiwi"), ("dog cat", "cat dog")]


def _heldout(path: Path, as_messages: bool = True) -> Path:
    rows = []
    for words, answer in ROWS:
        text = f"Sort these words alphabetically: {words}"
        prompt = [{"role": "user", "content": text}] if as_messages else text
        rows.append({"prompt": prompt, "reference": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task_file(tmp_path: Path, **spec) -> Path:
    _heldout(tmp_path / "heldout.jsonl")
    spec = {"name": "mysort", "heldout": "heldout.jsonl",
            "rewards": [{"name": "gold", "task": "sort"}], **spec}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_task_file_gives_prompts_gold_reward_threshold_and_references(tmp_path):
    task = resolve_task(str(_task_file(tmp_path, threshold=0.5)))
    assert task.name == "mysort" and task.kinds == ("prompt",) and task.threshold == 0.5
    rows = task.make_rows("prompt", 2, 0, "heldout")
    assert [r["prompt"][0]["content"] for r in rows] == [
        "Sort these words alphabetically: b a", "Sort these words alphabetically: kiwi apple fig"]
    prompts = [r["prompt"] for r in rows]
    assert task.score(prompts, ["a b", "apple kiwi fig"]) == pytest.approx([
        sort.gold_reward("Sort these words alphabetically: b a", "a b"),
        sort.gold_reward("Sort these words alphabetically: kiwi apple fig", "apple kiwi fig")])
    assert task.reference_answer("Sort these words alphabetically: b a") == "a b"
    with pytest.raises(ConfigError, match="held-out prompts only.*data.path"):
        task.make_rows("sft", 2, 0, "train")
    assert task_label(str(tmp_path / "task.yaml")) == "task"
    assert task_label({"heldout": "x/qa.jsonl", "rewards": []}) == "qa"


def test_several_rewards_are_summed_with_their_weights(tmp_path):
    half = {"name": "gold", "task": "sort", "weight": 0.5}
    two = resolve_task({"heldout": str(_heldout(tmp_path / "h.jsonl")), "rewards": [half, half]})
    one = resolve_task({"heldout": str(tmp_path / "h.jsonl"),
                        "rewards": [{"name": "gold", "task": "sort"}]})
    prompts = [r["prompt"] for r in one.make_rows("prompt", 3, 0, "heldout")]
    completions = ["a b", "fig", "cat dog"]
    assert two.score(prompts, completions) == pytest.approx(one.score(prompts, completions))
    assert two.name == "h" and two.threshold == 1.0


@pytest.mark.parametrize("spec,error,match", [
    ({"rewards": [{"name": "gold"}]}, ConfigError, r"data\.task\.heldout is not set"),
    ({"heldout": "h.jsonl"}, ConfigError, r"data\.task\.rewards: a list of reward plugin specs"),
    ({"heldout": "h.jsonl", "rewards": [{"name": "nope"}]}, ConfigError,
     r"data\.task\.rewards\[0\]\.name: unknown reward 'nope'; installed rewards: .*gold"),
    ({"heldout": "h.jsonl", "rewards": [{"name": "gold", "tsk": "sort"}]}, ConfigError,
     r"data\.task\.rewards\[0\]\.tsk; valid keys: task"),
    ({"heldout": "h.jsonl", "rewards": [{"name": "gold"}], "threshold": "high"}, ConfigError,
     r"data\.task\.threshold='high'"),
    ({"heldout": "h.jsonl", "rewards": [{"name": "gold"}], "prompts": "x"}, ConfigError,
     r"unknown key\(s\) prompts"),
    ({"heldout": "missing.jsonl", "rewards": [{"name": "gold"}]}, ConfigError, "no such file"),
    ({"heldout": "bad.jsonl", "rewards": [{"name": "gold"}]}, DataError,
     r"bad\.jsonl, row 1: 'prompt' must be a non-empty string or a list of \{role, content\}"),
])
def test_bad_task_files_are_clear_errors(tmp_path, monkeypatch, spec, error, match):
    monkeypatch.chdir(tmp_path)
    _heldout(tmp_path / "h.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(error, match=match):
        resolve_task(spec)


def test_an_unknown_task_name_lists_the_installed_ones():
    with pytest.raises(ConfigError, match=r"data\.task='nope' is unknown; installed tasks: "
                                          r"(\w+, )*safety, sort(, \w+)*, or a task file"):
        resolve_task("nope")


class Miscount(Reward):
    name = "miscount"

    def score(self, prompts, completions):
        return [1.0]


class NotANumber(Reward):
    name = "nan"

    def score(self, prompts, completions):
        return [float("nan")] * len(completions)


@pytest.mark.parametrize("plugin,match", [("miscount", r"returned shape \(1,\) for 2"),
                                          ("nan", "returned a non-finite reward")])
def test_a_reward_plugin_that_misbehaves_is_named(tmp_path, monkeypatch, plugin, match):
    real = registry.entry_points
    extra = [EntryPoint("miscount", f"{__name__}:Miscount", "x"),
             EntryPoint("nan", f"{__name__}:NotANumber", "x")]
    monkeypatch.setattr(registry, "entry_points", lambda group: list(real(group=group)) + (
        extra if group == registry.REWARDS.group else []))
    task = resolve_task({"heldout": str(_heldout(tmp_path / "h.jsonl")),
                         "rewards": [{"name": plugin}]})
    with pytest.raises(PluginError, match=rf"reward plugin '{plugin}' {match}"):
        task.score(["p", "q"], ["a", "b"])


# ---- in training and evaluation ------------------------------------------------------------
def _sft_file(tmp_path: Path) -> Path:
    rows = sort.make_rows("sft", 32, 0, "train")
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_a_run_on_your_data_is_evaluated_on_your_task_file(compose_cfg, tmp_path):
    from ptlight.train import train_stage

    (tmp_path / "task").mkdir()
    task = _task_file(tmp_path / "task", threshold=1.0)
    overrides = [*TINY, "method=sft", f"data.path={_sft_file(tmp_path)}",
                 f"data.task={task}", "eval.val_samples=2"]
    report = train_stage(compose_cfg(*overrides), tmp_path / "run", overrides)
    assert report["task"] == "mysort"
    for when in ("before", "after"):
        assert report[when]["num_prompts"] == 3 and 0 <= report[when]["gold/exact"] <= 1
        assert "acceptance/edit_distance" in report[when]  # the file's references
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val/gold/reward" in metrics and "val/gold/exact" in metrics
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "mysort" in card


@pytest.mark.slow
def test_your_data_without_a_task_gets_no_bundled_gold_metric(compose_cfg, tmp_path, capsys):
    from ptlight.train import train_stage

    overrides = [*TINY, "method=sft", f"data.path={_sft_file(tmp_path)}"]
    report = train_stage(compose_cfg(*overrides), tmp_path / "run", overrides)
    assert "before" not in report and "after" not in report and report["task"] is None
    out = capsys.readouterr().out
    assert out.count("no gold evaluation") == 1 and "data.task=<task name, or a task file" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["task"] is None
    # choosing the bundled task explicitly keeps it
    chosen = [*overrides, "data.task=sort"]
    assert "after" in train_stage(compose_cfg(*chosen), tmp_path / "run2", chosen)


@pytest.mark.slow
def test_eval_scores_the_untrained_start_on_a_task_file(compose_cfg, tmp_path):
    from ptlight.eval.app import run_eval

    task = _task_file(tmp_path)
    cfg = compose_cfg(*TINY, f"data.task={task}", "eval.num_pairs=0")
    result = run_eval(cfg, tmp_path / "eval")
    assert result["model"] == "lfm2 at init (seed 0)" and result["task"] == "mysort"
    assert result["gold"]["num_prompts"] == 3 and "gold/exact" in result["gold"]
    again = run_eval(cfg, tmp_path / "eval2")
    assert again["gold"]["samples"] == result["gold"]["samples"]  # the same start, seeded
    judged = run_eval(compose_cfg(*TINY, f"data.task={task}", "eval.num_pairs=0",
                                  "eval.judge={name: gold, task: sort, threshold: 1.0}"),
                      tmp_path / "eval3")
    assert 0 <= judged["judge"]["model/pass_rate"] <= 1


def test_eval_judge_without_a_task_is_an_error(compose_cfg, tmp_path):
    from ptlight.eval.app import run_eval

    cfg = compose_cfg(*TINY, "data.task=null", "eval.judge={name: gold, task: sort}",
                      "model.path=somewhere")
    with pytest.raises(ConfigError, match="eval.judge scores generations on the task's"):
        run_eval(cfg, tmp_path)


def test_eval_on_your_data_does_not_score_the_bundled_task(compose_cfg, tmp_path, capsys):
    from ptlight.eval.app import run_eval

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in sort.make_rows("pairwise", 8, 0,
                                                                          "train")))
    overrides = [*TINY, f"data.path={pairs}", "eval.num_pairs=4"]
    result = run_eval(compose_cfg(*overrides), tmp_path / "eval", overrides)
    assert result["task"] is None and "gold" not in result and "preference" in result
    assert "no gold evaluation" in capsys.readouterr().out
