"""A run killed with SIGKILL resumes to the same weights; checkpoint writes are atomic; the data
order is a function of (seed, epoch) and resumes mid-epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, metrics_losses
from ptlight.runtime.callbacks import AtomicCheckpointIO, atomic_torch_save
from ptlight.data.sampler import ResumableLoader, ResumableSampler

# 16 steps over 64 rows at batch 8: two epochs, so the resume crosses an epoch boundary too.
RUN = [*TINY, "method=sft", "trainer.max_steps=16", "trainer.val_check_interval=8",
       "eval.before=false", "eval.val_samples=0", "checkpoint.every_n_train_steps=1"]


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ptlight", *RUN, f"hydra.run.dir={run_dir}", *extra]


def _step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight = subprocess.run(_cli(tmp_path / "straight"), env=env, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    last = killed_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cli(killed_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and _step_of(last) >= 3:  # atomic: never a partial file to read
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up or save
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _step_of(last)
    print(f"killed at step {killed_at} of 16")
    assert 3 <= killed_at < 16 and not (killed_dir / "export").exists()

    resumed = subprocess.run(_cli(killed_dir, "ckpt_path=last"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr  # Lightning sees a stateful loader
    a, b = _weights(tmp_path / "straight"), _weights(killed_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume from step {killed_at}"


@pytest.mark.slow
def test_a_kill_during_save_never_leaves_a_corrupt_last_ckpt(tmp_path):
    target = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from ptlight.runtime.callbacks import atomic_torch_save\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_torch_save({'i': i, 'w': torch.full((4_000_000,), float(i))},"
        " Path(sys.argv[1]))\n"
    )
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)])
        while not target.is_file():
            time.sleep(0.01)
        time.sleep(0.3)  # writes of 16 MB are under way most of the time
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.all(ckpt["w"] == float(ckpt["i"]))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    atomic_torch_save({"i": 0}, target)  # the next save cleans up what a kill left behind
    assert all("last" not in name for name in leftovers)  # never mistaken for ckpt_path=last
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(ValueError, match="weights_only=True"):
        io.load_checkpoint(path, weights_only=False)


def _order(loader) -> list[int]:
    return [i for batch in loader for i in batch]


def _loader(n=20, batch=4, world=1, rank=0, seed=0):
    sampler = ResumableSampler(list(range(n)), num_replicas=world, rank=rank, seed=seed)
    return ResumableLoader(list(range(n)), batch_size=batch, sampler=sampler,
                           collate_fn=lambda rows: rows)


def test_data_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    loader = _loader()
    epoch0 = _order(loader)
    loader.sampler.set_epoch(1)
    epoch1 = _order(loader)
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    assert _order(_loader()) == epoch0  # a fresh process draws the same order

    it = iter(loader)  # epoch 1, killed after 2 batches
    seen = [next(it), next(it)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    fresh = _loader()
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)  # Lightning restores the epoch the same way
    assert [i for b in seen for i in b] + _order(fresh) == epoch1
    assert len(fresh) == 5  # the length Lightning sees stays the epoch's full length


def test_ranks_split_each_global_batch_of_one_process():
    single = list(_loader(batch=8))
    ranks = [list(_loader(batch=4, world=2, rank=r)) for r in range(2)]
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])


# ---- non-finite loss or gradients --------------------------------------------------------------
from ptlight.errors import ConfigError, TrainingError  # noqa: E402
from ptlight.methods.sft import SFTMethod  # noqa: E402
from ptlight.train import train_stage  # noqa: E402


def _poison(monkeypatch, steps: set[int], where: str) -> dict:
    """Make the sft loss (``where="loss"``) or only its gradients (``"grads"``) non-finite at
    the given optimizer steps; returns the policy weights seen at train start."""
    seen: dict = {}
    step = SFTMethod._step

    def poisoned(self, batch, split):
        loss = step(self, batch, split)
        if split == "train" and self.global_step in steps:
            if where == "loss":
                return loss * float("nan")
            p = next(self.policy.parameters())
            return loss + 0.0 * torch.sqrt((p - p.detach()).sum())  # value 0, gradient nan
        return loss

    monkeypatch.setattr(SFTMethod, "_step", poisoned)
    monkeypatch.setattr(SFTMethod, "on_train_start", lambda self: seen.update(
        {k: v.detach().clone() for k, v in self.policy.state_dict().items()}), raising=False)
    return seen


def test_skip_policy_counts_steps_and_never_moves_the_weights(compose_cfg, tmp_path,
                                                              monkeypatch):
    start = _poison(monkeypatch, {0, 1, 2}, "loss")
    cfg = compose_cfg("method=sft", "eval.before=false", *TINY)
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 3 and report["skipped_steps"] == 3
    final = load_file(tmp_path / "export" / "model.safetensors")
    assert final.keys() <= start.keys()  # (tied lm_head is not saved twice)
    for name, value in final.items():
        assert torch.equal(start[name], value), name
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("train/skipped_steps")
    assert [float(r.split(",")[col]) for r in rows if r.split(",")[col]] == [1.0, 2.0, 3.0]


def test_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path,
                                                                       monkeypatch):
    _poison(monkeypatch, {2}, "grads")
    cfg = compose_cfg("method=sft", "nonfinite.policy=stop", "eval.before=false", *TINY,
                      "trainer.max_steps=4", "checkpoint.every_n_train_steps=1")
    with pytest.raises(TrainingError, match=r"non-finite gradients .* at step 3; stopped "
                       r"\(nonfinite\.policy=stop\).*last good checkpoint is kept in .*checkpoints"):
        train_stage(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (tmp_path / "export").exists()  # a stopped run exports nothing


def test_skipping_forever_stops_after_max_consecutive(compose_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, {0, 1, 2}, "loss")
    cfg = compose_cfg("method=sft", "nonfinite.max_consecutive=2", "eval.before=false", *TINY)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 2; stopped \(2 "
                       r"non-finite steps in a row \(nonfinite\.max_consecutive=2\)\)"):
        train_stage(cfg, tmp_path)


def _guard_state(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if "NonFiniteGuard" in k)


def _device_or_host_checks(monkeypatch, on_device: bool) -> list[int]:
    """sft with fused AdamW on the CPU (the optimiser every method gets on CUDA), its guard
    checking each step on the device (``on_device``) or on the host; returns a list that
    collects the steps checked on the device."""
    import functools

    import ptlight.methods.common as common
    import ptlight.methods.sft as sft
    from ptlight.runtime.callbacks import NonFiniteGuard

    monkeypatch.setattr(sft, "configure_optim",
                        functools.partial(common.configure_optim, fused_on_cpu=True))
    on_device_steps: list[int] = []
    checks, skip = NonFiniteGuard._checks_on_device, NonFiniteGuard._skip_on_device
    monkeypatch.setattr(NonFiniteGuard, "_checks_on_device",
                        lambda self, *a: on_device and checks(self, *a))
    monkeypatch.setattr(NonFiniteGuard, "_skip_on_device", lambda self, trainer, *a: (
        on_device_steps.append(trainer.global_step), skip(self, trainer, *a))[1])
    return on_device_steps


@pytest.mark.parametrize("where", ["loss", "grads"])
def test_a_step_skipped_on_the_device_equals_the_host_check(compose_cfg, tmp_path, monkeypatch,
                                                            where):
    """Where the guard skips on the device (fused AdamW's ``found_inf``, its flags read a
    step later), a run with non-finite steps ends with the weights, optimiser state,
    metrics and skipped-step count of the host check, bitwise, and warns for the same
    steps."""
    overrides = ("method=sft", "eval.before=false", "eval.val_samples=0", *TINY,
                 "trainer.max_steps=7", "trainer.log_every_n_steps=10",
                 "checkpoint.every_n_train_steps=7")
    runs = {}
    for on_device in (True, False):
        with monkeypatch.context() as mp:
            device_steps = _device_or_host_checks(mp, on_device)
            _poison(mp, {1, 3, 4}, where)
            with pytest.warns(UserWarning, match="step skipped") as warned:
                report = train_stage(compose_cfg(*overrides), tmp_path / str(on_device))
        steps = [int(str(w.message).split(" at step ")[1].split(":")[0]) for w in warned
                 if "step skipped" in str(w.message)]
        runs[on_device] = (report["skipped_steps"], steps, device_steps)
    assert runs[True][:2] == runs[False][:2] == (3, [2, 4, 5])
    assert runs[True][2] == [0, 1, 2, 3, 4, 5] and runs[False][2] == []  # the last step logs
    device, host = tmp_path / "True", tmp_path / "False"
    assert (device / "metrics.csv").read_text() == (host / "metrics.csv").read_text()
    a, b = load_file(device / "export" / "model.safetensors"), load_file(
        host / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpts = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
             for d in (device, host)]
    for sa, sb in zip(*(c["optimizer_states"][0]["state"].values() for c in ckpts)):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _guard_state(ckpts[0]) == _guard_state(ckpts[1])


def test_steps_skipped_on_the_device_stop_after_max_consecutive_with_the_host_checkpoint(
        compose_cfg, tmp_path, monkeypatch):
    """The flags read a step late still stop the run at the step the host check stops it,
    before a checkpoint of that step is written: ``last.ckpt`` is the same step with the
    same weights and counts."""
    overrides = ("method=sft", "nonfinite.max_consecutive=2", "eval.before=false",
                 "eval.val_samples=0", *TINY, "trainer.max_steps=8",
                 "trainer.log_every_n_steps=10", "checkpoint.every_n_train_steps=1")
    for on_device in (True, False):
        with monkeypatch.context() as mp:
            device_steps = _device_or_host_checks(mp, on_device)
            _poison(mp, {2, 3}, "loss")
            with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 4; "
                               r"stopped \(2 non-finite steps in a row"):
                train_stage(compose_cfg(*overrides), tmp_path / str(on_device))
        assert bool(device_steps) == on_device
    ckpts = [torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)
             for d in ("True", "False")]
    assert ckpts[0]["global_step"] == ckpts[1]["global_step"] == 3
    assert _guard_state(ckpts[0]) == _guard_state(ckpts[1]) == {"skipped": 1, "consecutive": 1}
    for k, v in ckpts[1]["state_dict"].items():
        assert torch.equal(ckpts[0]["state_dict"][k], v), k


def test_under_ddp_a_step_bad_on_another_rank_is_skipped_on_this_one(monkeypatch):
    """The device check all-reduces its skip (MAX over ranks, on the device): a rank whose own
    loss and gradients are finite skips the step another rank found non-finite, moves no
    weight, and counts and names it as the host check does; a step finite on every rank
    updates."""
    from types import SimpleNamespace

    from ptlight.runtime.callbacks import NonFiniteGuard

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"] = True, False
    others: list[float] = [1.0, 0.0]  # the other rank's skip flag at each step
    ops = []

    def all_reduce(tensor, op=None):
        ops.append(op)
        tensor.copy_(torch.maximum(tensor, torch.full_like(tensor, others.pop(0))))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    guard = NonFiniteGuard("skip", max_consecutive=3)
    for step in (0, 1):
        p.grad = torch.ones(3)
        guard.observe_loss(torch.tensor(0.5))
        guard._skip_on_device(SimpleNamespace(world_size=2, global_step=step), opt, [p.grad])
        opt.step()
        if step == 0:
            assert torch.equal(p.detach(), torch.ones(3))  # skipped here too
            with pytest.warns(UserWarning, match=r"non-finite gradients \(the loss was finite "
                              r"on this rank\) at step 1: step skipped"):
                guard.resolve()
            assert (guard.skipped, guard.consecutive) == (1, 1)
    assert not torch.equal(p.detach(), torch.ones(3))  # the second step updated
    guard.resolve()
    assert (guard.skipped, guard.consecutive) == (1, 0)
    assert ops == [torch.distributed.ReduceOp.MAX] * 2
    assert getattr(opt, "found_inf", None) is None  # the flag lasts one step


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_clipping_reuses_the_guards_norm_with_lightnings_result(compose_cfg, tmp_path,
                                                                monkeypatch, method):
    """Clipping by norm takes the gradient norm the non-finite guard has just computed
    (``ptlight.runtime.callbacks.clip_gradients``) instead of reading every gradient again in
    ``clip_grad_norm_``; with a clip that binds at every step, the run's losses and final
    weights are those of Lightning's own clipping: bitwise with torch's default AdamW (sft on
    the CPU), within float rounding with fused AdamW (dpo on the CPU), whose kernel applies
    the clip as it reads the gradients instead of a pass that rescales them first."""
    import ptlight.runtime.callbacks as callbacks
    from ptlight.runtime.callbacks import NonFiniteGuard

    overrides = (f"method={method}", "eval.before=false", "eval.val_samples=0", *TINY,
                 "trainer.max_steps=4", "trainer.gradient_clip_val=0.01")
    norms, folded, scales_at_step = [], [], []
    taken, fold = NonFiniteGuard.take_norm, callbacks._fold_clip
    monkeypatch.setattr(NonFiniteGuard, "take_norm",
                        lambda self, opt: norms.append(taken(self, opt)) or norms[-1])
    monkeypatch.setattr(callbacks, "_fold_clip",
                        lambda opt, *a: folded.append(opt) or fold(opt, *a))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **k: pytest.fail("clip_grad_norm_ read the gradients again"))
    fused = torch._fused_adamw_

    def watched_fused_adamw(*a, grad_scale=None, **k):  # once per step and param group
        scales_at_step.append(grad_scale)
        return fused(*a, grad_scale=grad_scale, **k)

    monkeypatch.setattr(torch, "_fused_adamw_", watched_fused_adamw)
    train_stage(compose_cfg(*overrides), tmp_path / "shared")
    assert len(norms) == 4 and all(float(n) > 0.01 for n in norms)  # the clip bound each step
    if method == "dpo":  # fused on the CPU: each step divides by its own clip scale, then drops it
        assert len(folded) == 4 and all(isinstance(o, torch.optim.AdamW) for o in folded)
        groups = len(folded[0].param_groups)
        assert [float(s) for s in scales_at_step] == pytest.approx(
            [(float(n) + 1e-6) / 0.01 for n in norms for _ in range(groups)])
        assert getattr(folded[-1], "grad_scale", None) is None
    else:
        assert folded == [] and scales_at_step == []  # torch's default AdamW: not fused
    monkeypatch.undo()
    monkeypatch.setattr(NonFiniteGuard, "take_norm", lambda self, opt: None)  # Lightning's
    train_stage(compose_cfg(*overrides), tmp_path / "lightning")
    header, *rows = (tmp_path / "shared" / "metrics.csv").read_text().splitlines()
    shared = load_file(tmp_path / "shared" / "export" / "model.safetensors")
    plain = load_file(tmp_path / "lightning" / "export" / "model.safetensors")
    if method == "sft":
        assert (tmp_path / "lightning" / "metrics.csv").read_text().splitlines()[1:] == rows
        assert all(torch.equal(shared[k], plain[k]) for k in plain)
    else:
        assert metrics_losses(tmp_path / "shared") == pytest.approx(
            metrics_losses(tmp_path / "lightning"), rel=1e-5, abs=1e-6)
        for k in plain:
            torch.testing.assert_close(shared[k], plain[k], rtol=1e-5, atol=1e-6)


def test_a_clip_folded_into_fused_adamw_equals_clip_then_step_and_lasts_one_step():
    """``_fold_clip``: fused AdamW divides by the clip scale as it reads each gradient; the
    weights equal torch's clip-then-step within one rounding, the scale is gone after the
    step, and a step without a clip (the norm under the bound) is a plain step."""
    from ptlight.runtime.callbacks import _clip_folds_into_step, _fold_clip

    torch.manual_seed(0)
    start = [torch.randn(32, 16), torch.randn(16)]
    grads = [[torch.randn(32, 16) * c, torch.randn(16) * c] for c in (4.0, 40.0, 8.0)]
    grads.append([g * 1e-3 for g in grads[0]])  # under the bound: no clip

    def train(fold: bool | None):  # None: no clip at all
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=0.1)
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False
        assert _clip_folds_into_step(opt)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if fold:
                _fold_clip(opt, 1.0, norm)
            elif fold is not None:
                torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
            opt.step()
            assert getattr(opt, "grad_scale", None) is None
        return params, opt

    folded, opt = train(True)
    plain, _ = train(False)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(opt._optimizer_step_post_hooks) == 1  # one hook, however many steps
    unclipped, _ = train(None)  # what a fold that did nothing would give
    assert not torch.allclose(unclipped[0], plain[0], rtol=1e-4, atol=1e-4)
    unfused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert not _clip_folds_into_step(unfused)  # torch's per-tensor loop: clip_grads_with_norm_


def test_unknown_nonfinite_policy_fails_before_weights_load(compose_cfg, tmp_path, monkeypatch):
    import ptlight.train

    monkeypatch.setattr(ptlight.train, "build_policy", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=r"nonfinite\.policy='ignore'; use one of"):
        train_stage(compose_cfg("method=sft", "nonfinite.policy=ignore", *TINY), tmp_path)


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(compose_cfg, tmp_path):
    """What a requeued job needs: resume when there is a checkpoint, start when there is none."""
    cfg = compose_cfg("method=sft", "ckpt_path=last", "eval.before=false", "eval.val_samples=0",
                      *TINY)
    assert train_stage(cfg, tmp_path)["global_step"] == 3


# ---- SIGTERM, SIGINT, SLURM's requeue signal ----------------------------------------------------
import re  # noqa: E402
import shlex  # noqa: E402

# No periodic checkpoint: the one the run stops with is the only one.
STOP = [*TINY, "method=sft", "trainer.max_steps=16", "trainer.val_check_interval=8",
        "eval.before=false", "eval.val_samples=0", "checkpoint.every_n_train_steps=100"]


def _signalled(run_dir: Path, sig: int, env: dict | None = None) -> tuple[int, str, int]:
    """Start a 16-step run, send ``sig`` once metrics.csv shows step 3 (rows are written as they
    are logged), and return (exit status, stderr, the step the run says it stopped at)."""
    run_dir.mkdir(parents=True)
    err = run_dir.parent / f"{run_dir.name}.stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "ptlight", *STOP,
                                 f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                                stderr=stderr, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                    **(env or {})})
        try:
            metrics, deadline = run_dir / "metrics.csv", time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if metrics.is_file() and "\n0,3," in metrics.read_text():
                    break
                time.sleep(0.01)
            assert proc.poll() is None, "ended before the signal: " + err.read_text()[-2000:]
            os.kill(proc.pid, sig)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err.read_text()
    stopped = re.search(rf"ptlight: {signal.Signals(sig).name}: stopped at step (\d+); "
                        rf"checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 4 <= step < 8  # mid-epoch (8 batches an epoch), after the step it was signalled at
    assert _step_of(run_dir / "checkpoints" / "last.ckpt") == step
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not (run_dir / "export").exists()
    return proc.returncode, text, step


@pytest.mark.slow
def test_sigterm_checkpoints_exits_non_zero_and_its_resume_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight = subprocess.run([sys.executable, "-m", "ptlight", *STOP,
                               f"hydra.run.dir={tmp_path / 'straight'}"], env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "stopped"
    code, stderr, step = _signalled(run_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM  # what the scheduler sees: not a success
    command = stderr.split("ptlight: resume with:\n", 1)[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "ptlight"]
    assert argv[-2:] == [f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    resumed = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                             text=True, timeout=600)  # the printed command, as printed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(tmp_path / "straight"), _weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after SIGTERM at step {step}"
    rows = [line.split(",")[:2] for line in (run_dir / "metrics.csv").read_text().splitlines()]
    assert rows == [line.split(",")[:2] for line in
                    (tmp_path / "straight" / "metrics.csv").read_text().splitlines()]


@pytest.mark.slow
def test_sigint_checkpoints_and_says_how_to_resume(tmp_path):
    code, stderr, _ = _signalled(tmp_path / "run", signal.SIGINT)
    assert code == 128 + signal.SIGINT
    assert f"hydra.run.dir={tmp_path / 'run'} ckpt_path=last" in stderr


@pytest.mark.slow
def test_slurm_requeue_signal_checkpoints_and_requeues_the_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ptlight", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, stderr, _ = _signalled(tmp_path / "run", signal.SIGUSR1, env=slurm)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "ptlight: requeued SLURM job 4242" in stderr
    assert code == 128 + signal.SIGUSR1
    assert "hpc_ckpt" not in " ".join(p.name for p in (tmp_path / "run").iterdir())
