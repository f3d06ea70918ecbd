"""Sweeps: the value the app returns to a sweeper, the Optuna sweeper preset end to end, the
SLURM launcher preset's parameters, and the multirun table. The preset tests need the
``sweep``/``slurm`` extras (``pip install -e ".[sweep,slurm]"``) and skip without them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, TINY, run_cli


def test_the_app_returns_the_configured_sweep_metric(compose_cfg, tmp_path):
    from ptlight.pipeline import run

    cfg = compose_cfg("method=sft", "eval.before=false", "eval.val_samples=2",
                      "sweep_metric=val/gold/reward", *TINY)
    value = run(cfg, tmp_path, [])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert value == report["final_metrics"]["val/gold/reward"]


@pytest.mark.slow
def test_optuna_preset_minimises_the_returned_val_loss_and_report_tabulates_it(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    out = run_cli("-m", "method=dpo", *TINY, "eval.before=false", "eval.val_samples=0",
                  "hydra/sweeper=ptlight_optuna", "hydra.sweeper.n_trials=2",
                  f"hydra.sweep.dir={sweep_dir}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [json.loads((sweep_dir / str(j) / "eval.json").read_text())["final_metrics"]
              ["val/loss"] for j in range(2)]
    assert result["best_value"] == pytest.approx(min(losses))
    assert set(result["best_params"]) == {"method.optim.lr", "method.objective.beta"}
    table = subprocess.run([sys.executable, "-m", "ptlight.report", str(sweep_dir)],
                           capture_output=True, text=True, cwd=REPO)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 0 ")
            or line.startswith("| 1 ")]
    assert len(rows) == 2 and all("method.optim.lr=" in r for r in rows)
    assert (sweep_dir / "report.md").is_file()


def test_slurm_launcher_preset_sizes_jobs_from_the_trainer(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose
    from hydra.utils import instantiate

    compose_cfg()  # initialises Hydra on ptlight's configs
    cfg = compose(config_name="config", return_hydra_config=True,
                  overrides=["method=dpo", "trainer=ddp", "trainer.devices=4",
                             "trainer.num_nodes=2", "hydra/launcher=ptlight_slurm",
                             "hydra.launcher.partition=gpu"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (2, 4, 4)
    assert p["partition"] == "gpu" and p["max_num_timeout"] == 3
