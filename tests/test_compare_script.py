"""scripts/compare_objectives.py: the table from fake sweep dirs (fast), and the whole script end
to end (SFT, a two-method multirun, the start's gold score) on the tiny model."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, TINY

SCRIPT = REPO / "scripts" / "compare_objectives.py"


def _script():
    spec = importlib.util.spec_from_file_location("compare_objectives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(sweep, num, overrides, report):
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides))
    if report is not None:
        (sweep / str(num) / "eval.json").write_text(json.dumps(report))


def test_rows_sorted_by_gold_reward_with_missing_metrics_as_dashes(tmp_path):
    cmp = _script()
    after = lambda r: {"after": {"gold/reward": r, "gold/exact": r / 2}, "wall_time_s": 5.0}
    _job(tmp_path, 0, ["method=dpo", "model.path=x"],
         {**after(0.4), "final_metrics": {"val/rewards/accuracies": 0.75}})
    _job(tmp_path, 1, ["method=kto", "model.path=x"], {**after(0.6), "final_metrics": {}})
    _job(tmp_path, 2, ["method=ipo", "model.path=x"], None)  # a job that failed
    rows = cmp.by_gold_reward(cmp.job_rows(tmp_path))
    assert [(r["objective"], r["status"]) for r in rows] == [
        ("kto", "ok"), ("dpo", "ok"), ("ipo", "failed")]
    table = cmp.markdown(rows, "footer").splitlines()
    assert table[2] == "| kto | 0.600 | 0.300 | – | 5 |"
    assert table[3] == "| dpo | 0.400 | 0.200 | 0.750 | 5 |"
    assert table[4] == "| ipo (failed) | – | – | – | – |"


@pytest.mark.slow
def test_script_end_to_end_two_methods(tmp_path):
    budget = {"trainer.max_steps": "2", "trainer.val_check_interval": "2",
              "checkpoint.every_n_train_steps": "2"}
    overrides = [f"{k}={budget.get(k, v)}" for k, v in (o.split("=", 1) for o in TINY)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--methods", "dpo,ipo", "--out", str(tmp_path), "--",
         *overrides], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows[0]["objective"] == "sft (start)"
    assert sorted(r["objective"] for r in rows[1:]) == ["dpo", "ipo"]
    for r in rows:
        assert 0.0 <= r["gold/reward"] <= 1.0 and 0.0 <= r["gold/exact"] <= 1.0
    for r in rows[1:]:
        assert 0.0 <= r["val/rewards/accuracies"] <= 1.0 and r["global_step"] == 2
    table = (tmp_path / "compare.md").read_text()
    assert "| sft (start) |" in table and "| dpo |" in table and "| ipo |" in table
    assert "2 steps × batch 8" in table and "| sft (start) |" in proc.stdout
