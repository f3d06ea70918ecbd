"""What makes a run hold up: atomic checkpoints, exact resume, and the non-finite policy.

- :class:`AtomicCheckpointIO` — every checkpoint is written to a temporary file in the same
  directory, flushed to disk (``fsync``) and renamed over the old one (``os.replace``, atomic
  on POSIX). A kill at any moment leaves either the previous ``last.ckpt`` or the new one, never
  a truncated file. (Lightning's own writer goes through a temporary file in the system temp
  dir and ``shutil.move``, which is a copy, not a rename, when /tmp is another filesystem.)
  Checkpoints are read back with ``torch.load(weights_only=True)``: tensors and plain
  containers only, no arbitrary pickled code.
- :class:`RngState` — the Python, NumPy and torch (CPU + CUDA) random states ride in the
  checkpoint and are restored when training resumes, so dropout and sampling continue the
  same stream. With the resumable data order (:mod:`ptlight.data.sampler`) and Lightning's
  optimizer/scheduler/loop state this makes a resumed run equal an uninterrupted one.
- :class:`NonFiniteGuard` — the policy for a non-finite loss or gradient (``nonfinite.*``):
  ``skip`` drops the optimizer step (no weight moves), counts it (``train/skipped_steps``) and
  warns; ``stop`` ends the run with :class:`~ptlight.errors.TrainingError`. Either way the
  weights never take a non-finite update, so every checkpoint is a good one, and a run that
  stops keeps its last ``last.ckpt``. ``nonfinite.max_consecutive`` skipped steps in a row
  stop the run too (a run that only skips is not training). The gradient norm it checks is
  the one clipping by norm then uses (:func:`clip_gradients`), so the gradients are read once;
  with fused AdamW the clip is applied inside the optimiser's kernel, so they are not written
  back either. With fused AdamW (one process or DDP) under ``skip`` the check itself runs on
  the device: the kernel skips a non-finite step (its ``found_inf`` flag, as for AMP's grad
  scaler) and the guard reads the flags at the next step, checkpoint or the run's end, so a
  step never waits on the GPU for it; the counts, warnings, stops and checkpoints are the
  host check's (``tests/test_resume.py``). Steps whose values the loggers get are checked on
  the host, so ``train/skipped_steps`` is exact where it is written.
- :class:`Preemption` — SIGTERM (what SLURM and Kubernetes send before a kill), SIGINT (Ctrl+C)
  and, under SLURM, its requeue signal end the run at a step boundary with ``last.ckpt`` at that
  step, a non-zero exit and the command that resumes it.

How a method uses the guard: gradients are checked for every optimizer step with no code in the
method (Lightning calls ``on_before_optimizer_step`` in automatic and manual optimisation). The
loss is checked where the method computes it: pass it through
:func:`ptlight.methods.common.check_finite` before it is returned (automatic optimisation) or
before ``self.manual_backward(loss)`` (manual optimisation, e.g. PPO epochs). The decision is
taken jointly by all ranks (one all-reduce), so DDP/FSDP ranks skip or stop together.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ptlight.errors import ConfigError, TrainingError
from ptlight.runtime import progress

_PARTIAL = ".ptlight-save-{pid}.partial"  # no "last" in the name: Lightning's ckpt_path=last
                                          # picks any file whose name contains "last"
NONFINITE_POLICIES = ("skip", "stop")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a reader (or a kill) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(_PARTIAL.format(pid="*")):  # left by a killed run
        if stale.name != _PARTIAL.format(pid=os.getpid()):
            stale.unlink(missing_ok=True)
    tmp = path.parent / _PARTIAL.format(pid=os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic local writes, ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        if "://" in str(path):  # remote (fsspec) paths: Lightning's own transaction-based write
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("ptlight loads checkpoints with weights_only=True only")
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return super().load_checkpoint(path, map_location=location, weights_only=True)


class RngState(L.Callback):
    """Saves the global random states in each checkpoint; restores them when training resumes."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        return {
            "python": [version, list(state), gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                      np_gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state  # applied at on_train_start, right before the next step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteGuard(L.Callback):
    """Skip (and count) or stop on a non-finite loss or gradient; see the module docstring.

    policy:          ``skip`` | ``stop``.
    max_consecutive: under ``skip``, this many non-finite steps in a row stop the run.
    checkpoint_dir:  named in the stop message (where the last good checkpoint is).
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 10,
                 checkpoint_dir: str | None = None) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ConfigError(f"nonfinite.policy={policy!r}; use one of {NONFINITE_POLICIES}")
        if max_consecutive < 1:
            raise ConfigError(f"nonfinite.max_consecutive={max_consecutive}; use 1 or more")
        self.policy, self.max_consecutive = policy, max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.skipped = 0
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []  # observed since the last optimizer step
        self._norm: tuple[torch.optim.Optimizer, torch.Tensor] | None = None  # see take_norm
        self._pending: _Staged | None = None  # a step skipped (or not) on the device, unread
        self._staging: torch.Tensor | None = None  # pinned host buffer for it, on CUDA

    # ---- called by methods (ptlight.methods.common.check_finite) ---------------------------
    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember a training loss; at the optimizer step it belongs to, a non-finite one
        skips or stops that step. Nothing is read back here: the check waits until the
        backward is queued (on a GPU, reading the loss mid-step would hold the host until the
        forward had run, with the backward not yet launched)."""
        self._losses.append(loss.detach().float().reshape(-1))

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.resolve()  # the last step's, if it was checked on the device
        _drop_one_step(optimizer, "found_inf")  # one set for a step that never ran
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        self._norm = None
        if grads and self._checks_on_device(trainer, pl_module, optimizer):
            self._skip_on_device(trainer, optimizer, grads)
            return
        checks: dict[str, torch.Tensor] = {}  # the host check: read back together, one sync
        # 16-bit precision has a grad scaler that already skips overflowing steps
        if grads and not str(trainer.precision).startswith("16"):
            # clip_grad_norm_'s own norm of the same gradients (take_norm)
            norm = torch.nn.utils.get_total_norm(grads)
            finite = torch.isfinite(norm)
            checks["grads"] = finite.full_tensor() if hasattr(finite, "full_tensor") else finite
            self._norm = (optimizer, norm)
        losses = None
        if self._losses:
            losses = torch.cat(self._losses)
            self._losses = []
            checks["loss"] = torch.isfinite(losses).all()
        finite_flags = dict(zip(checks, _read_flags(list(checks.values()))))
        bad_grads = not finite_flags.get("grads", True)
        bad_loss = None
        if losses is not None and not finite_flags["loss"]:
            bad_loss = float(losses[~torch.isfinite(losses)][0])
        bad = trainer.strategy.reduce_boolean_decision(bad_loss is not None or bad_grads,
                                                       all=False)
        if bad:
            self._norm = None
            self._on_bad_step(trainer, optimizer, bad_loss)
        else:
            self.consecutive = 0
        if progress.logs_this_step(pl_module):
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True,
                          on_epoch=False)

    def _checks_on_device(self, trainer: L.Trainer, pl_module: L.LightningModule,
                          optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step's check can skip on the device and be read later: under
        ``skip`` (``stop`` ends the run at the bad step itself), automatic optimisation, no
        16-bit grad scaler (which owns ``found_inf``), a step whose values the loggers do not
        get (those read the skipped-step count now), and an optimizer whose fused kernel takes
        ``found_inf`` over plain tensors (one process or DDP; FSDP2's shards keep the host
        check)."""
        return (self.policy == "skip" and pl_module.automatic_optimization
                and not str(trainer.precision).startswith("16")
                and not progress.logs_this_step(pl_module)
                and _fused_adam_over_plain_tensors(optimizer)
                and getattr(optimizer, "found_inf", None) is None)

    def _skip_on_device(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer,
                        grads: list[torch.Tensor]) -> None:
        """The check without a host read: the optimizer gets ``found_inf`` (1.0 when the
        gradient norm or a loss is non-finite), the flag its fused kernel reads to leave every
        weight and moment as it is and to undo its step count, as it does for
        ``torch.amp.GradScaler``; so a non-finite step moves no weight, as on the host path.
        Under DDP the skip is all-reduced on the device (every rank skips if any has a
        non-finite value; an all-reduce queued on the device, not a host read).
        The flags are staged to host memory (pinned, behind a CUDA event) and read at the
        next optimizer step, checkpoint or the run's end (:meth:`resolve`), by when the GPU
        has long computed them: the step's kernels stay queued behind each other."""
        norm = torch.nn.utils.get_total_norm(grads)
        self._norm = (optimizer, norm)
        grads_ok = torch.isfinite(norm).reshape(1)
        loss_ok, first_bad = grads_ok.new_ones(1), norm.new_zeros(1)
        if self._losses:
            losses = torch.cat(self._losses).to(norm.device)
            self._losses = []
            finite = torch.isfinite(losses)
            loss_ok = finite.all().reshape(1)
            first_bad = losses.index_select(0, torch.argmin(finite.int()).reshape(1))
        bad = (~(grads_ok & loss_ok)).float()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        _set_for_one_step(optimizer, "found_inf", bad.reshape(()))  # 0-d, 1.0: skip
        flags = torch.cat([loss_ok.float(), first_bad.float(), bad])
        ready = None
        if flags.is_cuda:
            if self._staging is None:
                self._staging = torch.empty(3, pin_memory=True)
            self._staging.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            flags = self._staging
        self._pending = _Staged(trainer.global_step + 1, flags, ready)

    def resolve(self) -> None:
        """Read the step staged by :meth:`_skip_on_device`, if any: count it (skipped or a good
        one) and warn, or stop the run after ``nonfinite.max_consecutive`` in a row, as the
        host check does at the step itself. The values are read from host memory (``numpy``,
        no tensor op), after the CUDA event that says they are there."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        loss_ok, first_bad, skipped = (float(v) for v in pending.flags.numpy())
        if not skipped:
            self.consecutive = 0
            return
        self._count_bad_step(pending.step, None if loss_ok else first_bad)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve()

    def take_norm(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """The total gradient norm this step's check computed over ``optimizer``'s gradients,
        once (then ``None``): exactly what ``clip_grad_norm_`` would compute over the same
        list, so clipping by norm need not read every gradient a second time
        (:func:`clip_gradients`). ``None`` when the check computed none (16-bit precision,
        a skipped step) or for another optimizer."""
        taken, self._norm = self._norm, None
        return taken[1] if taken is not None and taken[0] is optimizer else None

    def _on_bad_step(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer,
                     bad_loss: float | None) -> None:
        self._count_bad_step(trainer.global_step + 1, bad_loss)
        for group in optimizer.param_groups:  # no gradient, no update (AdamW skips the param)
            for p in group["params"]:
                p.grad = None

    def _count_bad_step(self, step: int, bad_loss: float | None) -> None:
        what = (f"loss ({bad_loss})" if bad_loss is not None
                else "gradients (the loss was finite on this rank)")
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "stop" or self.consecutive >= self.max_consecutive:
            why = ("nonfinite.policy=stop" if self.policy == "stop" else
                   f"{self.consecutive} non-finite steps in a row "
                   f"(nonfinite.max_consecutive={self.max_consecutive})")
            where = (f"the last good checkpoint is kept in {self.checkpoint_dir}"
                     if self.checkpoint_dir else "no checkpoint was configured")
            other = ("nonfinite.policy=skip to skip such steps" if self.policy == "stop" else
                     "a higher nonfinite.max_consecutive")
            raise TrainingError(
                f"non-finite {what} at step {step}; stopped ({why}). No update was applied, so "
                f"{where} (resume with ckpt_path=last). Try a lower method.optim.lr, "
                f"trainer.gradient_clip_val, trainer.precision=32-true, or {other}."
            )
        rank_zero_warn(f"non-finite {what} at step {step}: step skipped, weights unchanged "
                       f"({self.skipped} skipped so far; nonfinite.policy=skip)")

    def state_dict(self) -> dict[str, int]:
        self.resolve()  # a checkpoint holds the counts up to its own step
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


class _Staged(NamedTuple):
    """A step checked on the device: its number, ``[losses finite (this rank), the first
    non-finite loss, skipped (any rank)]`` in host memory once ``ready`` (a
    CUDA event; ``None`` on the CPU, where the values are there when computed)."""
    step: int
    flags: torch.Tensor
    ready: Any


def _read_flags(flags: list[torch.Tensor]) -> list[bool]:
    """Boolean scalars, wherever they live, read to the host in one transfer."""
    if not flags:
        return []
    device = flags[0].device
    return [bool(f) for f in torch.stack([f.reshape(()).to(device) for f in flags]).tolist()]


def run_guard(trainer: L.Trainer | None) -> NonFiniteGuard | None:
    """The run's :class:`NonFiniteGuard` among ``trainer``'s callbacks, if any."""
    callbacks = trainer.callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, NonFiniteGuard)), None)


def _clip_folds_into_step(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer``'s step can apply the clip itself: torch's Adam/AdamW with every
    group fused (its kernel divides each gradient by the ``grad_scale`` tensor it finds on the
    optimizer, the hook ``torch.amp.GradScaler`` uses to unscale), over plain tensors (not
    FSDP2's DTensor shards), and no scale of anyone else's set."""
    return (getattr(optimizer, "grad_scale", None) is None
            and _fused_adam_over_plain_tensors(optimizer))


def _fused_adam_over_plain_tensors(optimizer: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW with every group fused, over plain tensors (not FSDP2's DTensor
    shards): the kernel that reads ``grad_scale`` and ``found_inf`` off the optimizer."""
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        DTensor = ()  # type: ignore[assignment,misc]
    return all(g.get("fused") and not any(isinstance(p, DTensor) for p in g["params"])
               for g in optimizer.param_groups)


_ONE_STEP = "_ptl_one_step"  # the attributes set on an optimizer for its next step only


def _set_for_one_step(optimizer: torch.optim.Optimizer, name: str, value: torch.Tensor) -> None:
    """Set ``optimizer.<name>`` (``grad_scale`` or ``found_inf``, which the fused AdamW step
    reads off the optimizer) for its next step only: a post-step hook, registered once per
    optimizer, removes it."""
    owned = optimizer.__dict__.get(_ONE_STEP)
    if owned is None:
        owned = optimizer.__dict__[_ONE_STEP] = set()
        optimizer.register_step_post_hook(lambda opt, *_: _drop_one_step(opt, *owned))
    setattr(optimizer, name, value)
    owned.add(name)


def _drop_one_step(optimizer: torch.optim.Optimizer, *names: str) -> None:
    """Remove what :func:`_set_for_one_step` set under ``names``, if it is still there (after
    the step, or left by a step that never ran)."""
    owned = optimizer.__dict__.get(_ONE_STEP, set())
    for name in names:
        if name in owned:
            optimizer.__dict__.pop(name, None)
            owned.discard(name)


def _fold_clip(optimizer: torch.optim.Optimizer, clip_val: float, norm: torch.Tensor) -> None:
    """Clip by norm inside the fused AdamW step: ``grad_scale = max(1, (norm + 1e-6) / clip)``,
    the divisor whose inverse is ``clip_grads_with_norm_``'s clamped coefficient, so the step
    sees the clipped gradients (equal within one rounding: a division instead of a
    multiplication) and no pass over the gradients multiplies them in place. The scale lives
    for one step: a post-step hook, registered once per optimizer, removes it."""
    _set_for_one_step(optimizer, "grad_scale", torch.clamp((norm + 1e-6) / clip_val, min=1.0))


def clip_gradients(module: L.LightningModule, optimizer: torch.optim.Optimizer,
                   clip_val: float | None, algorithm: str | None) -> None:
    """Clip as Lightning does (``trainer.gradient_clip_val`` / ``_algorithm``), by norm with
    the norm the run's :class:`NonFiniteGuard` has just computed when it did: the same
    ``get_total_norm`` over the same gradients, so one pass over the gradients is saved. With
    fused AdamW the clip then rides in the optimiser's own kernel (:func:`_fold_clip`); else
    torch's ``clip_grads_with_norm_`` applies it, which is all ``clip_grad_norm_`` does, so the
    result is bitwise Lightning's. Any other case (by value, 16-bit precision, a precision
    plugin with its own clipping) goes to Lightning's ``clip_gradients``."""
    from lightning.pytorch.plugins.precision import Precision

    _drop_one_step(optimizer, "grad_scale")  # one set for a step that never ran
    guard = run_guard(module.trainer)
    norm = guard.take_norm(optimizer) if guard is not None else None
    plugin = module.trainer.precision_plugin
    if (norm is not None and clip_val is not None and clip_val > 0
            and (algorithm or "norm") == "norm"
            and type(plugin).clip_grad_by_norm is Precision.clip_grad_by_norm
            and type(plugin).main_params is Precision.main_params):
        if _clip_folds_into_step(optimizer):
            _fold_clip(optimizer, float(clip_val), norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(list(plugin.main_params(optimizer)),
                                                 float(clip_val), norm)
        return
    module.clip_gradients(optimizer, gradient_clip_val=clip_val,
                          gradient_clip_algorithm=algorithm)


class Preemption(L.Callback):
    """End the run at a step boundary on SIGTERM, SIGINT or (under SLURM) SIGUSR1, with a
    checkpoint at that step, a non-zero exit and the command that resumes it.

    The handlers only note the signal. At the end of every optimizer step the ranks decide
    together (one all-reduce, like :class:`NonFiniteGuard`'s) whether any rank got one; if so
    every rank raises Lightning's ``SIGTERMException`` at that same point, and ``on_exception``
    writes ``last.ckpt`` through the trainer (all ranks take part; the checkpoint IO writes it
    atomically) — the state a periodic ``ModelCheckpoint`` save has at that step, so the
    resume is exact — and logs the step's metrics. It then prints how to resume and sets the
    exit status to 128 + the signal number (143 for SIGTERM, 130 for SIGINT) where Lightning's
    would be 0: the scheduler must not see a success. A second SIGINT stops at once, without
    a checkpoint. A signal during validation or before the first step stops at the end of the
    next training batch.

    Lightning's own SIGTERM handler (installed when training starts, and replaced by ours
    then) stops each rank wherever that rank notices the signal; a checkpoint, which is a
    collective operation, cannot be written from such unaligned points under DDP (the ranks
    deadlock). This callback therefore keeps Lightning's exception and ``on_exception``
    path but decides the stopping step itself.

    SLURM (``#SBATCH --signal=USR1@90``): SIGUSR1 is SLURM's requeue signal, as in Lightning.
    Lightning installs its requeue handler only when none is installed, so ours replaces it:
    checkpoint as above, then ``scontrol requeue <job>`` as Lightning's does (its own saves a
    mid-step ``hpc_ckpt_*.ckpt`` that ``ckpt_path=last`` would not read). The requeued job
    resumes when its command has ``ckpt_path=last`` and a fixed ``hydra.run.dir``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.checkpoint = run_dir / "checkpoints" / "last.ckpt"
        self.run_dir = run_dir
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False

    def _signals(self) -> list[int]:
        return [signal.SIGTERM, signal.SIGINT, *([signal.SIGUSR1] if SLURMEnvironment.detect()
                                                 else [])]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self.signum, self._active = None, True
        for signum in self._signals():
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:  # Lightning has just installed its SIGTERM handler: ours again
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._active:  # Lightning's teardown after an exception puts ours back: be the
            previous = self._previous.get(signum, signal.SIG_DFL)  # handler from before setup
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        if self.signum is None:
            self.signum = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = ((batch_idx + 1) % trainer.accumulate_grad_batches == 0
                   or batch_idx + 1 >= trainer.num_training_batches)
        if not stepped:  # mid-accumulation: the gradients so far would be lost
            return
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            raise SIGTERMException(128 + (self.signum or signal.SIGTERM))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt):
            if trainer.is_global_zero:
                print(f"ptlight: interrupted again: stopped without a checkpoint; "
                      f"{self.checkpoint} is the last one saved", file=sys.stderr)
            return
        if not isinstance(exception, SIGTERMException) or not self._stopped_by_us(exception):
            return
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # the whole training state
        # The step's metrics are sent to the loggers right after on_train_batch_end, where this
        # run stopped, and a resume does not redo the step: send them now, as Lightning would.
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        if not trainer.is_global_zero:
            return
        from ptlight.runtime.rundir import resume_command

        signum = int(exception.code) - 128  # type: ignore[arg-type]
        print(f"ptlight: {signal.Signals(signum).name}: stopped at step {trainer.global_step}; "
              f"checkpoint saved to {self.checkpoint}", file=sys.stderr)
        if signum == signal.SIGUSR1:
            print(f"ptlight: {_requeue()}; it resumes if its command has ckpt_path=last and "
                  f"this hydra.run.dir:", file=sys.stderr)
        else:
            print("ptlight: resume with:", file=sys.stderr)
        print(f"  {resume_command(self.run_dir)}", file=sys.stderr)

    @staticmethod
    def _stopped_by_us(exception: SIGTERMException) -> bool:
        return isinstance(exception.code, int) and exception.code > 128

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)


def _requeue() -> str:
    """``scontrol requeue`` this SLURM job (an array task by its array id), as Lightning does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job
           else os.environ["SLURM_JOB_ID"])
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as exc:
        return f"could not requeue SLURM job {job} (scontrol: {exc})"
    if result.returncode != 0:
        return (f"could not requeue SLURM job {job} (scontrol exit {result.returncode}: "
                f"{result.stderr.strip()})")
    return f"requeued SLURM job {job}"
