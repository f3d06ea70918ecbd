"""The worked example: the reversal task and reward plug into ptlight through entry points, its
data files are what the generator writes, and SFT -> DPO runs from files and the CLI alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptlight_reverse import ReverseReward, task

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = ["model.arch.hidden_size=64", "model.arch.intermediate_size=128",
        "model.arch.num_hidden_layers=3", "model.arch.layer_types=[conv,conv,full_attention]",
        "data.val_size=8", "data.batch_size=8", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.enable_progress_bar=false",
        "eval.num_prompts=8", "eval.max_new_tokens=12", "eval.val_samples=2"]


def test_reward_scores_positions_of_the_reversed_list():
    prompt = [{"role": "user", "content": "Reverse the order of these words: red fox runs"}]
    scores = ReverseReward()([prompt] * 3, ["runs fox red", "runs red", "red fox runs"])
    assert scores.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3])


def test_task_and_reward_are_installed_plugins():
    from ptlight.rewards import get_reward
    from ptlight.tasks import get_task

    assert get_task("reverse") is task and get_reward("reverse") is ReverseReward


def test_train_and_heldout_lists_never_share_a_word_set():
    train = {frozenset(w) for w in task.sample_lists(2000, 0, "train")}
    heldout = {frozenset(w) for w in task.sample_lists(200, 0, "heldout")}
    assert not train & heldout


def test_the_shipped_files_are_what_the_generator_writes(tmp_path):
    from ptlight_reverse.make_data import main

    main(tmp_path)
    for name in ("sft.jsonl", "pairs.jsonl", "heldout.jsonl", "task.yaml"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name


def test_the_task_file_evaluates_with_the_reward_plugin():
    from ptlight.tasks import resolve_task

    reverse = resolve_task(str(DATA / "task.yaml"))
    rows = reverse.make_rows("prompt", 3, 0, "heldout")
    refs = [json.loads(line)["reference"] for line in (DATA / "heldout.jsonl").open()][:3]
    assert reverse.name == "reverse" and reverse.threshold == 1.0
    assert reverse.score([r["prompt"] for r in rows], refs) == [1.0, 1.0, 1.0]


def _ptlight(*args: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ptlight", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_sft_then_dpo_from_files_and_the_cli(tmp_path):
    """The README's two commands, shortened: each run reports the gold metric of the task file
    before and after."""
    task_file = DATA / "task.yaml"
    _ptlight("method=sft", f"data.path={DATA / 'sft.jsonl'}", f"data.task={task_file}", *TINY,
             f"hydra.run.dir={tmp_path / 'sft'}", cwd=tmp_path)
    sft = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert sft["task"] == "reverse" and {"before", "after"} <= set(sft)
    _ptlight("method=dpo", f"model.path={tmp_path / 'sft' / 'export'}",
             f"data.path={DATA / 'pairs.jsonl'}", f"data.task={task_file}", *TINY,
             f"hydra.run.dir={tmp_path / 'dpo'}", cwd=tmp_path)
    dpo = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert dpo["task"] == "reverse" and dpo["before"]["num_prompts"] == 8
    assert "win_rate_vs_start" in dpo
