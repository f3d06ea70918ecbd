"""The run dir as the record of one run: one job at a time, resumes that continue it, and a
failed resume that leaves it as it was.

- :func:`guard_run_dir` wraps a stage (``train_stage(cfg, run_dir)``): it checks ``ckpt_path``
  before anything is written or loaded (:func:`check_resume`), holds the run dir's lock
  (:class:`RunDirLock`) for the whole stage, and when a resume fails before it has written a
  new checkpoint (a changed model size, an optimizer that does not match) it puts
  ``config.yaml`` back as it was and names the mismatch as a ConfigError.
- :class:`RunCSVLogger` — ``metrics.csv`` that a resume continues instead of deleting.
- :class:`RunRecord` — stores which method and objective wrote a checkpoint
  (``checkpoint["ptlight"]``), so that another method's run refuses to resume it.
- :func:`resume_command` — the command that resumes this run (printed when a signal stops it).
- :func:`atomic_dir` — a directory written beside its final place and renamed into it (exports).
"""

from __future__ import annotations

import csv
import fcntl
import functools
import json
import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ptlight.errors import ConfigError

LOCK_NAME = ".ptlight.lock"
LAST = Path("checkpoints") / "last.ckpt"


# ---- ckpt_path --------------------------------------------------------------------------------
def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint ``trainer.fit`` restores: ``ckpt_path=last`` is ``<run_dir>/checkpoints/
    last.ckpt`` and nothing else (None when there is none yet: the stage starts fresh); any
    other value is that path. Lightning's own ``"last"`` would take the newest file whose name
    contains "last", a stale ``last-v1.ckpt`` included."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if path == "last":
        last = run_dir / LAST
        return str(last) if last.exists() else None
    return str(path)


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse ``ckpt_path`` before anything is written or loaded: a missing file, a file that
    is not a Lightning checkpoint, or a checkpoint written by another method or objective.

    The checkpoint is opened with ``torch.load(weights_only=True, mmap=True)``: no pickled code
    runs and the tensors are not read. Remote (``s3://...``) paths and directories (FSDP's
    sharded checkpoints) are left to Lightning.
    """
    path = checkpoint_to_resume(cfg, run_dir)
    if path is None or "://" in path:
        return
    key = f"ckpt_path={cfg.ckpt_path}"
    file = Path(path).expanduser()
    if not file.exists():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(
            f"{key}: {file} does not exist{where}. Pass a checkpoint ptlight "
            "wrote (<run dir>/checkpoints/last.ckpt), ckpt_path=last to resume the run in "
            "hydra.run.dir, or no ckpt_path to start fresh")
    if file.is_dir():
        return
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a bad file; none is a bug here
        if "weights only load failed" in str(exc).lower():
            why = ("it holds pickled Python objects besides tensors and plain containers, and "
                   "ptlight does not unpickle those (they can run code)")
        else:
            why = (f"it is not a readable checkpoint ({type(exc).__name__}: truncated, corrupt, "
                   "or not a checkpoint at all)")
        raise ConfigError(f"{key}: {file} cannot be resumed: {why}. Pass a checkpoint ptlight "
                          "wrote (<run dir>/checkpoints/last.ckpt), or no ckpt_path to start "
                          "fresh") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "global_step"} <= ckpt.keys():
        raise ConfigError(f"{key}: {file} is not a Lightning training checkpoint (no "
                          "state_dict/global_step): a model export is loaded with model.path, "
                          "not resumed")
    _check_same_method(cfg, key, file, ckpt)


def _check_same_method(cfg: DictConfig, key: str, file: Path, ckpt: dict) -> None:
    """The method and objective that wrote ``ckpt`` (its ``ptlight`` record, or for a checkpoint
    without one the ``config.yaml`` of its run dir) must be this run's."""
    record = ckpt.get("ptlight")
    if record is None:
        try:
            saved = OmegaConf.load(file.parent.parent / "config.yaml").method
            record = {"method": saved.module, "objective": saved.objective.name}
        except Exception:  # no readable config.yaml beside it: nothing to compare with
            return
    ours = {"method": cfg.method.module, "objective": cfg.method.objective.name}
    if (record["method"], record["objective"]) != (ours["method"], ours["objective"]):
        raise ConfigError(
            f"{key}: {file} was written by method.module={record['method']} (objective "
            f"{record['objective']}) but this run is method.module={ours['method']} (objective "
            f"{ours['objective']}); a checkpoint resumes the method that wrote it. To train "
            f"{ours['objective']} from those weights, start a new run dir from the export: "
            f"model.path={file.parent.parent / 'export'}")


class RunRecord(L.Callback):
    """Writes ``checkpoint["ptlight"] = {"method", "objective"}`` into every checkpoint (read by
    :func:`check_resume`)."""

    def __init__(self, method: str, objective: str) -> None:
        self.record = {"method": method, "objective": objective}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["ptlight"] = dict(self.record)


# ---- the lock ---------------------------------------------------------------------------------
class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``<run_dir>/.ptlight.lock``, held while a stage runs.

    The file records the holder (pid, host, start time) for the error a second job gets. A
    stale lock needs no detection of its own: the kernel drops a flock when its process dies
    (SIGKILL included), so a lock file left by a dead job is simply not locked and the next job
    takes it over. The file is never deleted (deleting a lock file races with the next holder).
    On NFS, Linux maps flock to the server's byte-range locks (NFSv4, or NFSv3 with lockd).
    The lock is taken by global rank 0 only: the other ranks of a job share its run dir.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            try:
                who = json.loads(holder)
                who = (f"pid {who['pid']} on host {who['host']}, running since "
                       f"{who['started']}")
            except (ValueError, KeyError, TypeError):
                who = "a process that has not written its name yet"
            raise ConfigError(
                f"hydra.run.dir={self.path.parent} is in use by another ptlight job ({who}); "
                "two jobs in one run dir overwrite each other's checkpoints and metrics. "
                "Wait for it to end (or stop it), or pass another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ---- the stage guard --------------------------------------------------------------------------
def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def guard_run_dir(stage: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``stage(cfg, run_dir)``: :func:`ptlight.runtime.validate.check_config` and
    :func:`check_resume`, then the stage under the run dir's lock; a resume that fails without writing a checkpoint restores ``config.yaml``.

    ``metrics.csv`` needs no restoring: :class:`RunCSVLogger` changes it only when the resumed
    run logs its first metric, that is once training is under way.
    """
    @functools.wraps(stage)
    def guarded(cfg: DictConfig, run_dir: Path, *args: Any, **kwargs: Any) -> Any:
        from ptlight.runtime.validate import check_config

        check_config(cfg)  # bad values fail before the run dir (or its lock) is created
        check_resume(cfg, run_dir)
        if rank_zero_only.rank != 0:
            return stage(cfg, run_dir, *args, **kwargs)
        with RunDirLock(run_dir):
            config = run_dir / "config.yaml"
            before = config.read_bytes() if config.is_file() else None
            last = _file_state(run_dir / LAST)
            resumes = checkpoint_to_resume(cfg, run_dir) is not None
            try:
                return stage(cfg, run_dir, *args, **kwargs)
            except BaseException as exc:
                if resumes and before is not None and _file_state(run_dir / LAST) == last:
                    config.write_bytes(before)
                if resumes and isinstance(exc, RuntimeError) and _STATE_MISMATCH in str(exc):
                    raise _does_not_fit(cfg, run_dir, exc) from exc
                raise
    return guarded


_STATE_MISMATCH = "Error(s) in loading state_dict"


def _does_not_fit(cfg: DictConfig, run_dir: Path, exc: RuntimeError) -> ConfigError:
    """torch's load_state_dict error, as the config key to look at."""
    details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    first = (details[0] if details else str(exc).splitlines()[0]).rstrip(".")
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return ConfigError(
        f"ckpt_path={cfg.ckpt_path}: {checkpoint_to_resume(cfg, run_dir)} does not fit this "
        f"run's model: {first}{more}. A model.* key differs from the run that wrote it; resume "
        "with that run's model settings (its config.yaml), or start a new hydra.run.dir. The "
        "run dir is unchanged")


# ---- metrics.csv ------------------------------------------------------------------------------
class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing metrics.csv; see
    :class:`RunCSVLogger` for what it keeps."""

    def __init__(self, log_dir: str) -> None:
        self._continued = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._continued:
            self._continued = True
            self._continue_from(step if step is not None else 0, set(metrics_dict))
        super().log_metrics(metrics_dict, step)

    def _continue_from(self, step: int, keys: set[str]) -> None:
        """Keep the rows of ``metrics.csv`` that come before ``step``, the first step this run
        logs: rows at later steps (and same-kind rows at this step) were logged after the
        checkpoint the run resumed from, and the run logs them again."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if _before(r, step, keys)]
        if not rows:
            path.unlink()  # a fresh run (first step 0): a new file with its own columns
            return
        tmp = path.with_suffix(".csv.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)


def _before(row: dict[str, str], step: int, keys: set[str]) -> bool:
    try:
        row_step = int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return False
    if row_step != step:
        return row_step < step
    logged = {k for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}
    return not (logged & keys)  # e.g. the train row of a step whose validation is rerun


class RunCSVLogger(CSVLogger):
    """``<run_dir>/metrics.csv``, continued across resumes and written as it goes.

    Lightning's CSV logger deletes an existing metrics.csv. This one keeps it; when the run logs
    its first metric, at step ``s``, it drops the rows logged at steps ``>= s`` (by the earlier
    job after the checkpoint this run resumed from, so logged again now) and appends from
    there. A fresh run's first step is 0, so it starts a new file. Rows are flushed every step
    (``tail -f metrics.csv`` works; a killed run keeps what it logged).
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


# ---- the resume command -----------------------------------------------------------------------
def resume_command(run_dir: Path) -> str:
    """``python -m ptlight <this job's overrides> hydra.run.dir=<dir> ckpt_path=last``: under
    the Hydra app the job's own overrides and output dir (a pipeline's, not its stage's);
    otherwise ``run_dir`` with the overrides left to the user."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = [o for o in hc.overrides.task if not o.split("=", 1)[0].lstrip("+~")
                     in ("ckpt_path", "hydra.run.dir")]
        out = hc.runtime.output_dir
    else:
        overrides, out = ["<the same overrides>"], str(run_dir)
    return shlex.join(["python", "-m", "ptlight", *overrides, f"hydra.run.dir={out}",
                       "ckpt_path=last"]).replace("'<the same overrides>'",
                                                  "<the same overrides>")


# ---- directories written all at once ------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``final`` (``.<name>.partial-<pid>``); when the block
    ends without an exception its files are fsynced and it is renamed to ``final`` (an existing
    ``final`` is renamed aside first and then deleted). When the block raises, the partial
    directory is deleted and ``final`` is untouched. A kill leaves the previous ``final`` or,
    between the two renames, none; the next call clears what a killed one left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*final.parent.glob(f".{final.name}.partial-*"),
                  *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                _fsync(Path(root) / name)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
