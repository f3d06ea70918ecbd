"""The run dir across jobs: resumes continue metrics.csv, a failed resume changes nothing, one
job at a time, checkpoints always in last.ckpt, ckpt_path checked before weights load, another
method's checkpoint refused, exports written all at once (ptlight/runtime/rundir.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import TINY, run_cli
from ptlight.errors import ConfigError
from ptlight.runtime.rundir import RunDirLock, atomic_dir
from ptlight.train import train_stage

QUIET = ["eval.before=false", "eval.val_samples=0", *TINY]


def _sft(compose_cfg, *overrides):
    return compose_cfg("method=sft", *QUIET, *overrides)


def _rows(run_dir) -> list[tuple[str, str]]:
    """(step, "train" | "val") of every metrics.csv row."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(r["step"], "val" if r.get("val/loss") else "train") for r in csv.DictReader(f)]


@pytest.fixture
def no_weights(monkeypatch):
    import ptlight.train

    monkeypatch.setattr(ptlight.train, "build_policy", lambda *a: pytest.fail("weights loaded"))


# ---- metrics.csv and failed resumes --------------------------------------------------------------
def test_resuming_twice_leaves_one_continuous_metrics_csv(compose_cfg, tmp_path):
    for steps in (3, 6, 9):  # 0 -> 3, 3 -> 6, 6 -> 9 (a checkpoint every 3 steps)
        cfg = _sft(compose_cfg, f"trainer.max_steps={steps}", "ckpt_path=last")
        assert train_stage(cfg, tmp_path)["global_step"] == steps
        if steps == 3:
            first = (tmp_path / "metrics.csv").read_text().splitlines()
    train = [(str(s), "train") for s in range(9)]
    val = [(str(s), "val") for s in (2, 5, 8)]
    assert sorted(_rows(tmp_path), key=lambda r: (int(r[0]), r[1])) == sorted(
        train + val, key=lambda r: (int(r[0]), r[1]))
    # the first job's rows are kept as they were written
    assert (tmp_path / "metrics.csv").read_text().splitlines()[:len(first)] == first


def test_a_rerun_without_ckpt_path_starts_a_new_metrics_csv(compose_cfg, tmp_path):
    train_stage(_sft(compose_cfg), tmp_path)
    train_stage(_sft(compose_cfg, "trainer.max_steps=2"), tmp_path)
    assert [s for s, kind in _rows(tmp_path) if kind == "train"] == ["0", "1"]


def test_a_resume_that_fails_changes_nothing_in_the_run_dir(compose_cfg, tmp_path):
    train_stage(_sft(compose_cfg), tmp_path)
    before = {name: (tmp_path / name).read_bytes()
              for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt")}
    grown = _sft(compose_cfg, "model.arch.hidden_size=32", "trainer.max_steps=6",
                 "ckpt_path=last")  # another model size: the weights do not fit
    with pytest.raises(ConfigError, match=r"^ckpt_path=last: .*last\.ckpt does not fit this "
                       r"run's model: size mismatch for .* \(and \d+ more\)\. A model\.\* key "
                       r"differs .*The run dir is unchanged$"):
        train_stage(grown, tmp_path)
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, f"{name} changed"
    # and the run dir is free again: the right resume goes on from step 3
    resumed = _sft(compose_cfg, "trainer.max_steps=6", "ckpt_path=last")
    assert train_stage(resumed, tmp_path)["global_step"] == 6


# ---- last.ckpt, whatever the checkpoint settings -------------------------------------------------
def test_changed_checkpoint_settings_still_write_and_resume_last_ckpt(compose_cfg, tmp_path):
    train_stage(_sft(compose_cfg), tmp_path)  # a checkpoint every 3 steps
    ckpts = tmp_path / "checkpoints"
    stale = ckpts / "last-v1.ckpt"  # what Lightning's version counter used to leave, newer
    stale.write_bytes((ckpts / "last.ckpt").read_bytes())
    torch.save({**torch.load(stale, weights_only=True), "global_step": 1}, stale)
    cfg = _sft(compose_cfg, "checkpoint.every_n_train_steps=1", "trainer.max_steps=5",
               "ckpt_path=last")
    assert train_stage(cfg, tmp_path)["global_step"] == 5
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in ckpts.iterdir()) == ["last-v1.ckpt", "last.ckpt"]
    assert torch.load(stale, weights_only=True)["global_step"] == 1  # neither read nor written
    # the resumed run went on from step 3 (last.ckpt), not from the newer last-v1.ckpt's step 1
    assert [s for s, kind in _rows(tmp_path) if kind == "train"] == [str(s) for s in range(5)]


# ---- another method's checkpoint -----------------------------------------------------------------
def test_a_checkpoint_of_another_method_is_refused_before_weights_load(compose_cfg, tmp_path,
                                                                      monkeypatch):
    train_stage(_sft(compose_cfg), tmp_path)
    config = (tmp_path / "config.yaml").read_bytes()
    import ptlight.train

    monkeypatch.setattr(ptlight.train, "build_policy", lambda *a: pytest.fail("weights loaded"))
    dpo = compose_cfg("method=dpo", *QUIET, "ckpt_path=last")
    message = (r"ckpt_path=last: .*last\.ckpt was written by method\.module=sft \(objective sft\) "
               r"but this run is method\.module=preference \(objective dpo\).*model\.path=.*export")
    with pytest.raises(ConfigError, match=message):
        train_stage(dpo, tmp_path)
    assert (tmp_path / "config.yaml").read_bytes() == config
    ipo = compose_cfg("method=ipo", *QUIET, f"ckpt_path={tmp_path / 'checkpoints/last.ckpt'}")
    with pytest.raises(ConfigError, match=r"objective sft.*objective ipo"):
        train_stage(ipo, tmp_path / "other")
    # a checkpoint without ptlight's record (older ptlight): its run dir's config.yaml says
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["ptlight"]
    torch.save(ckpt, last)
    with pytest.raises(ConfigError, match=r"method\.module=sft \(objective sft\)"):
        train_stage(dpo, tmp_path)


# ---- ckpt_path that is no checkpoint -------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case", ["missing", "garbage", "empty", "truncated", "pickled", "plain"])
def test_ckpt_path_that_is_no_checkpoint_fails_before_weights_load(compose_cfg, tmp_path,
                                                                   no_weights, case):
    path = tmp_path / f"{case}.ckpt"
    if case == "garbage":
        path.write_bytes(b"\x00\x01 not a checkpoint " * 100)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save({"state_dict": {"w": torch.ones(100_000)}, "global_step": 3}, path)
        path.write_bytes(path.read_bytes()[:200_000])
    elif case == "pickled":
        torch.save({"state_dict": {}, "global_step": 3, "evil": _Payload()}, path)
    elif case == "plain":  # tensors only, e.g. a state dict saved by hand
        torch.save({"w": torch.ones(3)}, path)
    expected = {
        "missing": r"does not exist\. Pass a checkpoint ptlight wrote",
        "garbage": r"cannot be resumed: it is not a readable checkpoint",
        "empty": r"cannot be resumed: it is not a readable checkpoint",
        "truncated": r"cannot be resumed: it is not a readable checkpoint",
        "pickled": r"cannot be resumed: it holds pickled Python objects",
        "plain": r"is not a Lightning training checkpoint",
    }[case]
    with pytest.raises(ConfigError, match=rf"^ckpt_path={path}: {path} .*{expected}") as err:
        train_stage(_sft(compose_cfg, f"ckpt_path={path}"), tmp_path / "run")
    assert "weights_only=False" not in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything is written


@pytest.mark.slow
def test_ckpt_path_to_a_missing_file_on_the_command_line(tmp_path):
    result = run_cli("method=sft", *QUIET, "ckpt_path=nope/last.ckpt",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"ptlight: error: ckpt_path=nope/last.ckpt: nope/last.ckpt does not exist (relative "
            f"to {tmp_path})") in result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr


# ---- one job per run dir -------------------------------------------------------------------------
HOLD = ("import sys, time\nfrom pathlib import Path\nfrom ptlight.runtime.rundir import RunDirLock\n"
        "with RunDirLock(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n")


@pytest.mark.slow
def test_a_second_job_in_a_locked_run_dir_is_refused_and_a_stale_lock_taken_over(
        compose_cfg, tmp_path, no_weights):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = (rf"hydra\.run\.dir={tmp_path} is in use by another ptlight job \(pid "
                   rf"{holder.pid} on host {socket.gethostname()}, running since .*\).*another "
                   r"hydra\.run\.dir")
        with pytest.raises(ConfigError, match=message):
            train_stage(_sft(compose_cfg), tmp_path)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to unlock; the kernel drops the flock
        holder.wait()
    lock = tmp_path / ".ptlight.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead job's name stays
    with RunDirLock(tmp_path):  # ... and its lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()} on host"):
            with RunDirLock(tmp_path):  # a second holder, even in the same process
                pass
    with RunDirLock(tmp_path):  # released on exit
        pass


# ---- exports -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy():
    from helpers import tiny_model_cfg
    from ptlight.model.backbone import build_policy, load_tokenizer

    cfg = tiny_model_cfg()
    tok = load_tokenizer(cfg)
    return cfg, tok, build_policy(cfg, tok)


def _disk_full(monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    def full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # part of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_a_failed_export_keeps_the_previous_one(tiny_policy, tmp_path, monkeypatch):
    from ptlight.model.backbone import export_model

    cfg, tok, policy = tiny_policy
    export = tmp_path / "export"
    export_model(policy, tok, export, cfg)
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    assert "model.safetensors" in before and "config.json" in before
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    with monkeypatch.context() as m:
        _disk_full(m)
        with pytest.raises(OSError, match="No space left"):
            export_model(policy, tok, export, cfg)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial dir left beside it
    export_model(policy, tok, export, cfg)  # a new export replaces the old one whole
    assert (export / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_failed_first_export_leaves_no_export(tiny_policy, tmp_path, monkeypatch):
    from ptlight.model.backbone import export_model

    cfg, tok, policy = tiny_policy
    _disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        export_model(policy, tok, tmp_path / "export", cfg)
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_clears_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".export.partial-999999").mkdir()
    (tmp_path / ".export.partial-999999" / "config.json").write_text("{}")
    with atomic_dir(tmp_path / "export") as d:
        (d / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "a.txt").read_text() == "a"
