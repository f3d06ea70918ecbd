"""In-process training stages: precision, reference modes, what a stage returns."""

import csv
import json
import math

import pytest
import torch

from helpers import TINY
from ptlight.train import train_stage


def _add_callback(monkeypatch, callback) -> None:
    """Every ``lightning.Trainer`` built from here on gets ``callback`` too."""
    import lightning as L

    init = L.Trainer.__init__
    monkeypatch.setattr(L.Trainer, "__init__", lambda self, *a, **k: init(
        self, *a, **{**k, "callbacks": [*(k.get("callbacks") or []), callback]}))


# six steps, metrics and the progress bar's values on the fifth and sixth only (counted from
# 1), no validation or checkpoint in between: steps 2-4 are ones that write nothing
QUIET_STEPS = ("eval.before=false", "eval.val_samples=0", *TINY, "trainer.max_steps=6",
               "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=true",
               "trainer.val_check_interval=100", "checkpoint.every_n_train_steps=100")


def _after_step_bookkeeping(monkeypatch, call) -> None:
    """``call()`` at the end of each training step's bookkeeping: after the module's and every
    callback's ``on_train_batch_end``, Lightning's logger connector gathers the step's logged
    values (reading the ``prog_bar`` ones to the host) and, on the steps the loggers get,
    writes them."""
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import (
        _LoggerConnector,
    )

    update = _LoggerConnector.update_train_step_metrics

    def update_then_call(self):
        try:
            update(self)
        finally:
            call()

    monkeypatch.setattr(_LoggerConnector, "update_train_step_metrics", update_then_call)


def _metrics(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dpo_step_in_both_precisions(compose_cfg, tmp_path, precision):
    cfg = compose_cfg("method=dpo", f"trainer.precision={precision}", "eval.before=false", *TINY)
    report = train_stage(cfg, tmp_path)
    losses = _metrics(tmp_path)
    assert report["global_step"] == 3 and len(losses) == 3
    assert all(math.isfinite(v) for _, v in losses)
    assert losses[0][1] == pytest.approx(math.log(2), abs=1e-3 if precision == "32-true" else 2e-2)


def test_precomputed_reference_matches_the_frozen_copy(compose_cfg, tmp_path):
    runs = {}
    for mode in ("copy", "precompute"):
        cfg = compose_cfg("method=dpo", f"method.reference={mode}", "eval.before=false", *TINY)
        train_stage(cfg, tmp_path / mode)
        runs[mode] = _metrics(tmp_path / mode)
    assert [s for s, _ in runs["copy"]] == [s for s, _ in runs["precompute"]]
    for (_, a), (_, b) in zip(runs["copy"], runs["precompute"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_gradient_accumulation_and_clipping_come_from_trainer_config(compose_cfg, tmp_path):
    cfg = compose_cfg("method=sft", "trainer.accumulate_grad_batches=2",
                      "trainer.gradient_clip_val=0.5", "eval.before=false", *TINY)
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 3  # optimizer steps, each over 2 batches
    assert report["data"]["train_rows"] == 64


def test_resume_from_last_checkpoint_continues_the_step_count(compose_cfg, tmp_path):
    cfg = compose_cfg("method=dpo", "eval.before=false", *TINY)
    first = train_stage(cfg, tmp_path)
    assert first["global_step"] == 3 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    before = _metrics(tmp_path)
    resumed = train_stage(compose_cfg("method=dpo", "eval.before=false", *TINY,
                                      "trainer.max_steps=5", "ckpt_path=last"), tmp_path)
    assert resumed["global_step"] == 5
    after = _metrics(tmp_path)  # the resumed run appended the new steps to metrics.csv
    assert after[:3] == before and [s for s, _ in after] == [0, 1, 2, 3, 4]


def test_every_validation_writes_samples_and_a_gold_reward_point(compose_cfg, tmp_path):
    import json

    cfg = compose_cfg("method=sft", "eval.val_samples=3", *TINY)
    train_stage(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    at_step = [r for r in rows if r["when"] == "step 3"]
    assert len(at_step) == 3 and all(0.0 <= r["reward"] <= 1.0 for r in at_step)
    assert {r["when"] for r in rows} == {"before", "step 3", "after"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "val/gold/reward" in header


def test_a_stage_reports_its_win_rate_against_the_model_it_started_from(compose_cfg, tmp_path):
    cfg = compose_cfg("method=sft", "eval.before=true", "eval.val_samples=0", *TINY)
    report = train_stage(cfg, tmp_path)
    wins = report["win_rate_vs_start"]
    assert wins["num_prompts"] == cfg.eval.num_prompts
    assert wins["win_rate"] + wins["tie_rate"] + wins["loss_rate"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "eval.json").read_text())["win_rate_vs_start"] == wins
    cfg = compose_cfg("method=sft", "eval.before=false", "eval.val_samples=0", *TINY)
    assert "win_rate_vs_start" not in train_stage(cfg, tmp_path / "no_before")


def test_eval_num_prompts_zero_trains_and_exports_without_a_gold_evaluation(compose_cfg,
                                                                           tmp_path):
    cfg = compose_cfg("method=dpo", "eval.before=true", "eval.val_samples=0", *TINY,
                      "eval.num_prompts=0")
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 3
    assert not {"before", "after", "win_rate_vs_start"} & set(report)
    assert (tmp_path / "export" / "config.json").is_file()
    assert "after" not in json.loads((tmp_path / "eval.json").read_text())
    cfg = compose_cfg("method=rm", "eval.num_pairs=0", *TINY)  # no held-out pair accuracy
    assert "heldout" not in train_stage(cfg, tmp_path / "rm")


@pytest.mark.parametrize("method,extra", [
    ("dpo", ()), ("sft", ("trainer.accumulate_grad_batches=2",)),
    ("grpo", ("method.rollout.max_new_tokens=4", "method.rollout.num_generations=2"))])
def test_metrics_are_logged_only_on_the_steps_the_loggers_write(compose_cfg, tmp_path,
                                                                monkeypatch, method, extra):
    """Training metrics reach ``self.log`` on the steps whose values Lightning writes
    (every ``log_every_n_steps``-th and the last), the loss every step (the progress bar),
    and the token diagnostics (accuracy, entropy: passes over every scored token's
    vocabulary) are computed on those steps only: metrics.csv and the report's final metrics
    are those of a run that logs and computes every value every step."""
    import importlib

    import lightning as L

    import ptlight.runtime.progress as progress

    overrides = (f"method={method}", "eval.before=false", "eval.val_samples=0", *TINY, *extra,
                 "trainer.max_steps=5", "trainer.log_every_n_steps=2",
                 "trainer.val_check_interval=100", "checkpoint.every_n_train_steps=100")
    logged_at: list[tuple[int, str]] = []
    real_log = L.LightningModule.log

    def log(self, name, *a, **k):
        if self.trainer.training and not self.trainer.validating:
            logged_at.append((self.trainer.global_step, name))
        return real_log(self, name, *a, **k)

    monkeypatch.setattr(L.LightningModule, "log", log)
    step: list[int] = []  # the training step running, if any
    scored: list[tuple[int, bool]] = []  # (step, with_diagnostics) of the policy's scoring

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step[:] = [trainer.global_step]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step.clear()

    if method != "grpo":
        module = importlib.import_module(
            f"ptlight.methods.{'preference' if method == 'dpo' else method}")
        real_scoring = module.completion_logps

        def scoring(*a, **k):
            if step and torch.is_grad_enabled():
                scored.append((step[0], k.get("with_diagnostics", True)))
            return real_scoring(*a, **k)

        monkeypatch.setattr(module, "completion_logps", scoring)
    _add_callback(monkeypatch, Window())
    gated = train_stage(compose_cfg(*overrides), tmp_path / "gated")
    if method != "grpo":  # (grpo steps its optimiser itself: its global step runs ahead)
        metric_steps = {step for step, name in logged_at if name != "train/loss"}
        assert metric_steps == {1, 3, 4}  # steps 2, 4 and the last (5), counted from 0
        assert {step for step, name in logged_at if name == "train/loss"} == set(range(5))
        assert {s for s, _ in scored} == set(range(5))
        assert {s for s, with_diagnostics in scored if with_diagnostics} == metric_steps
        assert {s for s, with_diagnostics in scored if not with_diagnostics} == {0, 2}
    monkeypatch.setattr(progress, "logs_this_step", lambda module: True)
    every = train_stage(compose_cfg(*overrides), tmp_path / "every")
    timed = ("train/rollout/seconds", "train/rollout/tokens_per_s")  # wall-clock readings

    def untimed(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in timed}

    assert untimed(gated["final_metrics"]) == untimed(every["final_metrics"])
    assert "train/loss" in gated["final_metrics"] and len(gated["final_metrics"]) > 3
    rows = {}
    for run in ("gated", "every"):
        with open(tmp_path / run / "metrics.csv") as f:
            rows[run] = [untimed(r) for r in csv.DictReader(f)]
    assert rows["gated"] == rows["every"]
    if method != "grpo":
        assert [r["step"] for r in rows["gated"] if r.get("train/loss")] == ["1", "3"]


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_the_training_bar_shows_the_loss_read_on_the_logged_steps(compose_cfg, tmp_path,
                                                                  monkeypatch, method):
    """The progress bar shows ``train/loss``, a value no method logs with ``prog_bar`` (which
    Lightning would read to the host after every step): the first step's, then the logged
    step's (the value metrics.csv holds), kept on screen in between."""
    from ptlight.runtime.progress import TrainingBar

    shown: dict[int, float | None] = {}  # the bar's values after each step, by steps done
    get_metrics = TrainingBar.get_metrics

    def spy(self, trainer, pl_module):
        values = get_metrics(self, trainer, pl_module)
        if trainer.training and not trainer.validating:
            shown[trainer.global_step] = values.get("train/loss")
        return values

    monkeypatch.setattr(TrainingBar, "get_metrics", spy)
    train_stage(compose_cfg(f"method={method}", *QUIET_STEPS), tmp_path)
    logged = dict(_metrics(tmp_path))
    assert sorted(shown) == [1, 2, 3, 4, 5, 6] and None not in shown.values()
    assert shown[2] == shown[3] == shown[4] == shown[1]  # steps 2-4: not read again
    assert shown[5] == pytest.approx(logged[4])  # the fifth step (step 4 from 0), logged


# ops a CUDA tensor answers only after the queued kernels ran: a scalar or a comparison read
# back to the host, and outputs whose size depends on the data (the kernel counts them first)
_HOST_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "equal", "is_nonzero", "bincount",
             "masked_scatter_backward"}  # masked_scatter's backward selects by its mask


def waits_on_a_gpu(func, args: tuple, kwargs: dict) -> bool:
    """Whether this aten call, as dispatched on the CPU, makes a CUDA device synchronise with
    the host: the ops in :data:`_HOST_OPS`, ``repeat_interleave`` without ``output_size``, and
    indexing (read or write) with a boolean mask, which runs ``nonzero`` inside the kernel,
    where a dispatch mode does not see it."""
    name = func._opname
    if name in _HOST_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices)
    return False


def test_the_gpu_wait_counter_sees_the_syncs_a_dispatch_mode_hides():
    """The CPU counter below counts what would make a GPU step wait even where the wait sits
    inside a kernel or a backward formula: boolean-mask indexing both ways, masked_scatter's
    backward, repeat_interleave without its output size; not index_select or masked_fill."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Waits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if waits_on_a_gpu(func, args, kwargs or {}):
                seen.append(func._opname)
            return func(*args, **(kwargs or {}))

    mask = torch.tensor([True, False, True, True])
    values = torch.randn(3, requires_grad=True)
    x = torch.randn(4, requires_grad=True)
    with Waits():
        torch.zeros(4).masked_scatter(mask, values).sum().backward()
        x[mask].sum().backward()
        torch.zeros(4)[mask] = 1.0
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        x.index_select(0, torch.tensor([0, 2])).sum().backward()
        torch.zeros(4).masked_fill(mask, 1.0)
    assert seen == ["masked_scatter_backward", "index", "index_put", "index_put_",
                    "repeat_interleave"]


@pytest.mark.parametrize("run", [("dpo", "method.reference=copy"),
                                 ("dpo", "method.reference=precompute"), ("sft",), ("kto",),
                                 ("rm",), ("tdpo",), ("sparsepo",), ("listwise_pl",),
                                 ("rdrop",)],
                         ids=lambda run: "-".join(run).split("=")[-1])
def test_a_training_step_never_waits_on_the_device(compose_cfg, tmp_path, monkeypatch, run):
    """Between fetching its batch and its last hook, a training step with the progress bar
    on reads no tensor back to the host, and makes none from Python values, on steps whose
    values the loggers do not get and that save no checkpoint: the non-finite guard skips a
    bad step on the device (fused AdamW's ``found_inf``) and reads its staged flags a step
    later; on a GPU every read of a device tensor waits for the queued kernels, and a tensor
    made from a Python value is a blocking copy to the GPU. Each method runs as on CUDA:
    fused AdamW (the CPU keeps torch's loop for sft and rm), and a padded batch's attention
    mask built without asking the host whether a row is padded (the CPU keeps transformers'
    skip); DPO packed, with a live and a precomputed reference; the per-token preference
    path with a live reference's terms (tdpo) and its hidden states (sparsepo), listwise
    rows, and SFT's two-pass R-Drop. Counted on the CPU:
    ``item``/``bool``/``float`` (``_local_scalar_dense``) and the other ops a CUDA tensor
    answers on the host, plus ``tolist``; ``torch.tensor`` (``lift_fresh``)."""
    import functools
    import importlib

    import lightning as L
    from torch.utils._python_dispatch import TorchDispatchMode

    import ptlight.methods.common as common
    from ptlight.model import masks

    method, *overrides = run
    reads: dict[int, int] = {}
    from_host: dict[int, int] = {}  # tensors made from Python values: a copy to a GPU

    class Reads(TorchDispatchMode):
        step = -1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if waits_on_a_gpu(func, args, kwargs or {}):
                reads[self.step] = reads.get(self.step, 0) + 1
            if func._opname == "lift_fresh":
                from_host[self.step] = from_host.get(self.step, 0) + 1
            return func(*args, **(kwargs or {}))

    mode = Reads()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        if mode.step >= 0:
            reads[mode.step] = reads.get(mode.step, 0) + 1
        return tolist(t)

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            mode.step = trainer.global_step
            mode.__enter__()

    def step_bookkeeping_done():  # after every hook and Lightning's metric bookkeeping
        mode.__exit__(None, None, None)
        mode.step = -1

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    _after_step_bookkeeping(monkeypatch, step_bookkeeping_done)
    # the padded forward's attention mask as built off the CPU (ptlight.model.masks)
    monkeypatch.setattr(masks, "HOST_SKIP_DEVICES", ())
    for module in ("sft", "reward"):
        monkeypatch.setattr(importlib.import_module(f"ptlight.methods.{module}"),
                            "configure_optim",
                            functools.partial(common.configure_optim, fused_on_cpu=True))
    _add_callback(monkeypatch, Window())
    train_stage(compose_cfg(f"method={method}", *QUIET_STEPS, *overrides), tmp_path)
    assert reads[0] == 1  # the bar's first values
    assert [reads.get(step, 0) for step in (1, 2, 3)] == [0, 0, 0]
    assert [from_host.get(step, 0) for step in (1, 2, 3)] == [0, 0, 0]
    assert reads[4] > 1 and reads[5] > 1  # the logged steps: their values go to the loggers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("run", [("dpo", "method.pack=true", "method.reference=precompute"),
                                 ("dpo", "method.reference=copy"), ("sft",), ("kto",), ("rm",),
                                 ("dpo", "method.pack=true", "method.reference=precompute",
                                  "model.compile=true"),
                                 ("dpo", "method.pack=true", "method.reference=precompute",
                                  "model.compile=true", "model.packed_attention=flex"),
                                 ("tdpo", "method.pack=true"), ("rdrop",)],
                         ids=["dpo-packed", "dpo-live", "sft", "kto", "rm", "dpo-compiled",
                              "dpo-flex-compiled", "tdpo-packed", "rdrop"])
def test_a_gpu_training_step_never_synchronises(compose_cfg, tmp_path, monkeypatch, run):
    """A training step on CUDA in bf16-mixed (fused AdamW, the clip folded into it, the
    guard's check on the device, the progress bar on; DPO packed with a precomputed
    reference, as the GPU defaults run it, padded with a live one, and packed through the
    compiled layers, with SDPA's mask and with FlexAttention's, whose profile on the H200
    showed 51 scalar read-backs a step) makes no
    device-to-host synchronisation from its batch's copy to the device to the end of
    Lightning's bookkeeping of the step, on steps whose values the loggers do not get:
    torch's sync debug mode turns one into an error."""
    from lightning.pytorch.strategies import Strategy

    method, *overrides = run
    window: list[int] = []
    to_device = Strategy.batch_to_device

    def batch_to_device(self, batch, *args, **kwargs):
        trainer = self.lightning_module.trainer
        if trainer.training and not trainer.validating and trainer.global_step in (1, 2, 3):
            window.append(trainer.global_step)
            torch.cuda.set_sync_debug_mode("error")
        return to_device(self, batch, *args, **kwargs)

    monkeypatch.setattr(Strategy, "batch_to_device", batch_to_device)
    _after_step_bookkeeping(monkeypatch, lambda: torch.cuda.set_sync_debug_mode("default"))
    try:
        train_stage(compose_cfg(f"method={method}", *QUIET_STEPS, *overrides), tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window == [1, 2, 3]
