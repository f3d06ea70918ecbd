"""scripts/sparsepo_report.py end to end on the tiny model (SFT, then dpo / tdpo / sparsepo from
its export at the same budget), and scripts/bench_sparsepo_memory.py at its tiny shape."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, TINY


def _entry_points_dir(tmp_path):
    """A dist-info that declares this checkout's sparsepo/tdpo entry points: the child
    processes find them by name even where the installed ptlight metadata predates them
    (after a reinstall the duplicates point at the same classes)."""
    site = tmp_path / "eps"
    info = site / "ptlight_sparsepo_eps-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ptlight-sparsepo-eps\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[ptlight.objectives]\nsparsepo = ptlight.objectives.sparsepo:SparsePO\n"
        "tdpo = ptlight.objectives.tdpo:TDPO\n")
    return site


@pytest.mark.slow
def test_report_script_end_to_end(tmp_path):
    budget = {"trainer.max_steps": "2", "trainer.val_check_interval": "2",
              "checkpoint.every_n_train_steps": "2"}
    overrides = [f"{k}={budget.get(k, v)}" for k, v in (o.split("=", 1) for o in TINY)]
    path = os.pathsep.join([str(REPO), str(_entry_points_dir(tmp_path)),
                            os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sparsepo_report.py"),
         "--runs", "dpo,tdpo,sparsepo-learnable,sparsepo-activation", "--out", str(tmp_path),
         "--", *overrides], cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "sparsepo.json").read_text())
    rows = {r["run"]: r for r in report["rows"]}
    assert list(rows) == ["sft (start)", "dpo", "tdpo", "sparsepo-learnable",
                          "sparsepo-activation"]
    for r in rows.values():
        assert 0.0 <= r["gold/reward"] <= 1.0 and 0.0 <= r["gold/exact"] <= 1.0
    for name in ("sparsepo-learnable", "sparsepo-activation"):
        assert 0.0 <= rows[name]["mask/sparsity_chosen"] <= 1.0
        assert rows[name]["global_step"] == 2
    assert rows["dpo"]["mask/sparsity_chosen"] is None  # no mask: "–" in the table
    assert report["date"] and report["versions"]["torch"]
    assert "| tdpo |" in (tmp_path / "sparsepo.md").read_text()


@pytest.mark.slow
def test_memory_bench_tiny_shape(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_sparsepo_memory.py"), "--shape", "tiny",
         "--steps", "1", "--configs", "dpo (copy),sparsepo learnable (copy)",
         "--out", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "sparsepo_memory.json").read_text())
    assert [r["config"] for r in record["runs"]] == ["dpo (copy)", "sparsepo learnable (copy)"]
    assert all(r["peak_mb"] > 0 for r in record["runs"])
    assert "| sparsepo learnable (copy) |" in proc.stdout
