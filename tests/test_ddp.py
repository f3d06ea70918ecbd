"""``trainer=ddp`` on CPU (gloo): two processes with per-device batch 4 follow the same loss
trajectory as one process with batch 8, metrics are reduced across ranks, and only rank 0
writes the export."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from helpers import REPO, TINY, run_cli

COMMON = [*TINY, "method=dpo", "trainer.max_steps=6", "trainer.val_check_interval=3",
          "eval.before=false", "eval.val_samples=0"]


def _curve(run_dir, key):
    rows = csv.DictReader(open(run_dir / "metrics.csv"))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(compose_cfg,
                                                                         tmp_path):
    from ptlight.train import train_stage

    one, two = tmp_path / "one", tmp_path / "two"
    train_stage(compose_cfg(*COMMON, "data.batch_size=8"), one)  # the 1-process reference
    out = run_cli(*COMMON, "trainer=ddp", "trainer.devices=2", "data.batch_size=4",
                  f"hydra.run.dir={two}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stdout + out.stderr

    for key in ("train/loss", "train/rewards/accuracies", "val/loss"):
        a, b = _curve(one, key), _curve(two, key)
        assert a.keys() == b.keys() and len(a) >= 2, key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-5), (key, step)
    wa = load_file(one / "export" / "model.safetensors")
    wb = load_file(two / "export" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

    report = json.loads((two / "eval.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 6
    # each rank logs to its own Hydra job log; only rank 0's says it wrote the export
    assert "rank 0 of 2 wrote" in (two / "__main__.log").read_text()
    assert "wrote" not in (two / "train_ddp_process_1.log").read_text()


def test_the_pipeline_refuses_a_lightning_launched_ddp(compose_cfg, tmp_path, monkeypatch):
    from ptlight.errors import ConfigError
    from ptlight.pipeline import run

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    cfg = compose_cfg("trainer=ddp", *TINY)
    with pytest.raises(ConfigError, match=r"Run the stages one by one .*torchrun / srun"):
        run(cfg, tmp_path, ["trainer=ddp"])


def test_multiprocess_detection(compose_cfg):
    from ptlight.runtime.strategy import multiprocess

    assert multiprocess(compose_cfg("trainer=ddp").trainer)
    assert not multiprocess(compose_cfg().trainer)
    assert not multiprocess(compose_cfg("trainer=ddp", "trainer.devices=1").trainer)
    assert multiprocess(compose_cfg("trainer.devices=2").trainer)


def test_a_ddp_multirun_needs_a_launcher_that_starts_the_ranks(compose_cfg, monkeypatch):
    import ptlight.runtime.strategy as strategy
    from ptlight.errors import ConfigError

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setattr(strategy, "_in_multirun", lambda: True)
    ddp = compose_cfg("trainer=ddp").trainer
    with pytest.raises(ConfigError, match=r"hydra/launcher=ptlight_slurm .*ddp_spawn"):
        strategy.check_pipeline_launch(ddp, pipeline=False)
    strategy.check_pipeline_launch(compose_cfg("trainer=ddp", "trainer.strategy=ddp_spawn")
                                   .trainer, pipeline=False)  # spawns fresh ranks per fit
    monkeypatch.setenv("SLURM_PROCID", "0")  # srun started the ranks: every job joins them
    strategy.check_pipeline_launch(ddp, pipeline=False)
    strategy.check_pipeline_launch(ddp, pipeline=True)


@pytest.mark.slow
def test_torchrun_runs_the_whole_pipeline_on_every_rank(tmp_path):
    """torchrun starts the ranks (as on a cluster): each stage's Trainer joins them, rank 0
    exports and reports, rank 1 waits at the barrier and starts the next stage from it."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(port), "-m", "ptlight", "trainer=ddp", *TINY,
         "trainer.max_steps=2", "eval.val_samples=0", "eval.num_prompts=4",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    stages = json.loads((run_dir / "pipeline.json").read_text())
    assert [(s["stage"], s["world_size"], s["global_step"]) for s in stages] == [
        ("sft", 2, 2), ("dpo", 2, 2)]
    assert (out.stdout + out.stderr).count("gold metric on 4 held-out prompts") == 1


@pytest.mark.slow
@pytest.mark.parametrize("method,policy,why,counts", [
    ("sft", ["nonfinite.policy=stop"], "nonfinite.policy=stop",
     {"skipped": 0, "consecutive": 0}),
    ("dpo", ["nonfinite.max_consecutive=2", "trainer.log_every_n_steps=50"],
     "2 non-finite steps in a row (nonfinite.max_consecutive=2)",
     {"skipped": 1, "consecutive": 1})])
def test_a_diverging_ddp_run_stops_on_every_rank_with_the_last_good_checkpoint(
        tmp_path, method, policy, why, counts):
    """lr=1e30 makes the gradients non-finite within a few steps; the decision is all-reduced,
    so both ranks stop at the same step (no hang) and the checkpoint holds finite weights and
    the guard's counts. sft stops at the first such step (``stop``, checked on the host);
    dpo's fused AdamW under ``skip`` checks each step on the device, its skip all-reduced
    there, and stops at ``nonfinite.max_consecutive``."""
    import torch

    run_dir = tmp_path / "run"
    out = run_cli(*TINY, f"method={method}", "trainer=ddp", "data.batch_size=4",
                  "trainer.max_steps=20", "checkpoint.every_n_train_steps=1",
                  "method.optim.lr=1e30", "trainer.gradient_clip_val=null", *policy,
                  "eval.before=false", "eval.val_samples=0", f"hydra.run.dir={run_dir}",
                  cwd=REPO, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("ptlight: error:")]
    # rank 0's line; rank 1 raises the same at the same step, unless Lightning's launcher has
    # already ended it (rank 0's exception handler kills the ranks it started)
    assert errors and all(e == errors[0] for e in errors)
    assert f"stopped ({why})" in errors[0]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert f"at step {ckpt['global_step'] + 1};" in errors[0]
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert next(v for k, v in ckpt["callbacks"].items() if "NonFiniteGuard" in k) == counts
    assert not (run_dir / "export").exists()
