"""One training stage, top to bottom, without branching on method names.

    cfg -> objective (by name, from entry points; hyperparameters checked)
        -> method class (data kind, reference kind checked) -> tokenizer -> DataModule
        -> policy + Reference -> method LightningModule -> lightning.Trainer.fit
        -> HF export + gold eval -> run dir (+ model card, samples.jsonl, report.md + plots)

Everything that can fail on the user's config (objective name and keys, objective vs method
data kind, reference kind, data rows) fails before model weights are loaded. The method is
driven only through the hooks of :class:`ptlight.methods.base.Method`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ptlight.data.module import PtlDataModule
from ptlight.engine.cpu_bf16 import precision_plugins
from ptlight.engine.fused_proj import auto_fuses, install_fused_projections
from ptlight.engine.lean import install_lean_mlp
from ptlight.engine.memory import pin_mmap_threshold
from ptlight.engine.offload import offload_directory
from ptlight.errors import ConfigError, PluginError
from ptlight.eval.gold import ValidationSamples, gold_eval, log_samples, win_rate
from ptlight.methods import get_method
from ptlight.methods.base import Method
from ptlight.model.backbone import build_policy, export_model, load_export, load_tokenizer
from ptlight.model.reference import auto_reference, build_reference, reference_mode
from ptlight.objectives import Objective
from ptlight.registry import OBJECTIVES, REWARDS, settings_of
from ptlight.report import write_model_card, write_run_report
from ptlight.runtime.callbacks import AtomicCheckpointIO, NonFiniteGuard, Preemption, RngState
from ptlight.runtime.devices import (configure_cuda, covers_an_epoch, data_defaults,
                                     device_defaults, resolve_trainer, single_process,
                                     uses_cuda)
from ptlight.runtime.progress import TrainingBar
from ptlight.runtime.rundir import (RunCSVLogger, RunRecord, checkpoint_to_resume,
                                    guard_run_dir)
from ptlight.runtime.strategy import (build_strategy, fsdp_without_rank0_generation,
                                      full_module_state, is_fsdp, submodule_state)
from ptlight.runtime.validate import (check_config, check_overrides, override_keys,
                                      written_keys)
from ptlight.tasks import Task, resolve_task

log = logging.getLogger(__name__)

# PPO (manual optimisation) checkpoints after its optimiser steps, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@guard_run_dir  # ckpt_path checked, run dir locked, a failed resume leaves it as it was
def train_stage(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None
                ) -> dict[str, Any]:
    """Run one method on one config; returns the eval report (also written to eval.json).

    ``overrides``: the command-line overrides the config was composed with, when known; keys
    of ``method.objective`` they do not name are the method config's defaults, which an
    objective chosen by name may drop (:func:`build_stage_objective`).
    """
    started = time.time()
    cfg, objective = _settle(cfg, run_dir, overrides)
    method_cls = get_method(cfg.method.module)
    _check_method(cfg, method_cls, objective)  # before the data loads (auto: as copy)
    task = resolve_task(cfg.data.task, args=cfg.data.get("task_args"))  # a task file's reward plugins are built here
    offload = offload_directory(cfg.optimizer_offload) if cfg.get("optimizer_offload") else None
    trainer_cfg, precision = precision_plugins(cfg.trainer, cfg.cpu_bf16)
    guard = NonFiniteGuard(cfg.nonfinite.policy, cfg.nonfinite.max_consecutive,
                           checkpoint_dir=str(run_dir / "checkpoints"))
    tokenizer = load_tokenizer(cfg.model)
    datamodule = PtlDataModule(cfg.data, tokenizer, method_cls.data_kind_for(cfg.method, objective))
    datamodule.setup()
    cfg = _settle_with_data(cfg, run_dir, objective, method_cls, len(datamodule.train))
    _check_compile_packed(cfg)
    datamodule.num_workers = int(cfg.data.get("num_workers", 0) or 0)
    ref_mode = _check_method(cfg, method_cls, objective)
    extra = method_cls.extra_args(cfg, tokenizer)

    policy = build_policy(cfg.model, tokenizer)  # the first weights loaded
    if cfg.model.get("fuse_projections") == "auto":  # on CUDA: settled by the model's width
        cfg = OmegaConf.merge(cfg, {"model": {"fuse_projections": auto_fuses(policy)}})
        _save_config(cfg, run_dir)
    keep_copy = _resumes(cfg, run_dir) or is_fsdp(cfg.trainer.get("strategy"))
    reference = build_reference(ref_mode, policy, keep_copy=keep_copy)
    generates = method_cls.generates
    report: dict[str, Any] = {"method": cfg.method.module, "objective": objective.name,
                              "task": None if task is None else task.name,
                              "data": datamodule.report()}
    start_samples: list = []  # the start model's gold-scored generations (eval.before)
    gold = task is not None and cfg.eval.num_prompts > 0  # eval.num_prompts=0: no gold eval
    if gold and cfg.eval.before and generates and rank_zero_only.rank == 0:
        report["before"] = gold_eval(policy, tokenizer, task, cfg.eval, keep=start_samples)

    optim = cfg.method.optim if not offload else OmegaConf.create(  # AdamW's moments in a file
        {**OmegaConf.to_container(cfg.method.optim, resolve=True), "offload_dir": offload})
    module: Method = method_cls(policy=policy, objective=objective, optim=optim,
                                reference=reference, **extra)
    samples = (ValidationSamples(tokenizer, task, cfg.eval, objective.name)
               if task is not None and cfg.eval.val_samples and generates
               and not fsdp_without_rank0_generation(cfg.trainer) else None)
    callbacks = _callbacks(cfg, run_dir, guard, objective, samples)
    trainer_cfg, strategy = build_strategy(trainer_cfg, policy)  # FSDP: wrap policy resolved
    if not strategy and not cfg.model.get("compile"):
        # LFM2's MLPs keep 2 activations instead of 4 (a compiled MLP is inductor's; FSDP's
        # unsharded weights are its own): ptlight.engine.lean
        install_lean_mlp(policy)
        if cfg.model.get("fuse_projections") is True:  # q/k/v and w1/w3 as one matmul each
            install_fused_projections(policy)             # (ptlight.engine.fused_proj)
    trainer: L.Trainer = instantiate(
        trainer_cfg, default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir),
        callbacks=callbacks, plugins=[AtomicCheckpointIO(), *precision], **strategy,
        **method_cls.trainer_overrides(cfg),
    )
    fit_started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint_to_resume(cfg, run_dir))
    report["fit_time_s"] = round(time.time() - fit_started, 1)  # trainer.fit alone

    _export_and_evaluate(cfg, run_dir, trainer, module, policy, tokenizer, task, report,
                         start_samples, samples, guard)
    report["wall_time_s"] = round(time.time() - started, 1)
    if trainer.is_global_zero:
        _write_run(cfg, run_dir, report, trainer)
    trainer.strategy.barrier("export")  # other ranks wait: a next stage reads this export
    return report


# ---- before any weights load --------------------------------------------------------------------
def _settle(cfg: DictConfig, run_dir: Path, overrides: list[str] | None
            ) -> tuple[DictConfig, Objective]:
    """Checks, machine-dependent settings and the run dir's ``config.yaml``; returns the config
    with ``trainer.accelerator``/``precision`` and the ``auto`` keys resolved for this machine
    (:func:`ptlight.runtime.devices.device_defaults`), and the stage's objective."""
    check_config(cfg)  # before anything is written or loaded (ptlight.runtime.validate)
    check_overrides(cfg, overrides)
    cfg = drop_unchosen_task(cfg, overrides)  # never a bundled task's gold metric on your data
    cfg = drop_unwritten_reward_defaults(cfg, overrides)  # reward.name=<plugin> alone works
    if cfg.get("malloc_mmap_threshold"):  # opt-in: lower peak RSS, slower steps
        pin_mmap_threshold(int(cfg.malloc_mmap_threshold))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.merge(cfg, {"trainer": resolve_trainer(cfg.trainer)})
    objective = build_stage_objective(cfg, overrides)
    cuda = uses_cuda(cfg.trainer)
    cfg = OmegaConf.merge(cfg, device_defaults(cfg, cuda))
    if cuda:
        configure_cuda(cfg.get("cudnn_attention", False))
    if cfg.get("optimizer_offload") and cuda:
        raise ConfigError("optimizer_offload streams CPU parameters' AdamW state through a "
                          "file; this run trains on a CUDA GPU: set optimizer_offload=null")
    if cfg.model.get("packed_attention") == "flex" and not cuda:
        raise ConfigError("model.packed_attention=flex: torch's FlexAttention has no backward "
                          "on the CPU, and this run trains on the CPU: use "
                          "model.packed_attention=sdpa (the default)")
    _save_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return cfg, objective


def _check_compile_packed(cfg: DictConfig) -> None:
    """``model.compile=packed`` and ``model.packed_attention=flex`` change packed scoring
    only: refused, before any weights load, for a run that never packs (it would run as if
    they were unset, without a word)."""
    if cfg.method.get("pack") is True:
        return
    if "pack" in cfg.method:
        why = "method.pack is false" + (" (auto settles packing on CUDA only with a "
                                        "precomputed reference, i.e. a run over every train "
                                        "row)" if uses_cuda(cfg.trainer) else "")
    elif any(isinstance(cfg.method.get(k), DictConfig) for k in ("rollout", "ppo")):
        why = ("the RL methods' packed scoring (method.rollout.pack, method.ppo.pack) is not "
               "one of the calls it covers")
    else:
        why = "this method has no packed scoring"
    if cfg.model.get("compile") == "packed":
        raise ConfigError(f"model.compile=packed compiles the preference methods' packed "
                          f"scoring, and this run does not pack: {why}. Use model.compile=true "
                          f"(norms and MLPs in every call), or set method.pack=true")
    if cfg.model.get("packed_attention") == "flex":
        raise ConfigError(f"model.packed_attention=flex is the attention of the preference "
                          f"methods' packed scoring, and this run does not pack: {why}. Set "
                          f"method.pack=true, or model.packed_attention=sdpa")


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _settle_with_data(cfg: DictConfig, run_dir: Path, objective: Objective,
                      method_cls: type[Method], train_rows: int) -> DictConfig:
    """``method.reference``, ``method.pack`` and ``data.num_workers`` left at ``auto``, settled
    now that the train split's size is known, before any weights load (config.yaml records
    them)."""
    cuda = uses_cuda(cfg.trainer)
    covers = covers_an_epoch(cfg.trainer, int(cfg.data.batch_size), train_rows)
    reference = auto_reference(objective, method_cls.reference_modes, cuda,
                               single_process(cfg.trainer), covers)
    extra = data_defaults(cfg, cuda, reference)
    if not extra:
        return cfg
    cfg = OmegaConf.merge(cfg, extra)
    _save_config(cfg, run_dir)
    return cfg


def drop_unchosen_task(cfg: DictConfig, overrides: list[str] | None) -> DictConfig:
    """``cfg`` with ``data.task`` null (and one line saying so) when ``data.path`` is given
    while ``data.task`` is still the data config's bundled default, not chosen on the command
    line (by ``data.task=`` or ``data=``); else ``cfg`` unchanged."""
    if overrides is None or cfg.data.get("path") is None or cfg.data.get("task") is None:
        return cfg
    keys = override_keys(overrides)
    if "data.task" in keys or "data" in keys or not isinstance(cfg.data.task, str):
        return cfg
    if rank_zero_only.rank == 0:
        print(f"[ptlight] no gold evaluation: data.path is your data and no task was chosen "
              f"(the default data.task={cfg.data.task} belongs to the bundled data). Add one "
              "with data.task=<task name, or a task file: held-out prompts + reward plugins> "
              "(docs/tasks.md)")
    return OmegaConf.merge(cfg, {"data": {"task": None}})


def drop_unwritten_reward_defaults(cfg: DictConfig, overrides: list[str] | None
                                   ) -> DictConfig:
    """``cfg`` without the ``reward`` settings that the reward plugin chosen by
    ``reward.name`` does not take and that ``overrides`` do not name: defaults of the reward
    config (``gold``'s ``task``) left behind by naming another plugin, dropped with one info
    line, as :func:`build_stage_objective` does for ``method.objective``. A setting written on
    the command line stays, and the reward's builder refuses it, naming it."""
    spec = cfg.get("reward")
    written = written_keys(overrides, "reward")
    if written is None or not isinstance(spec, DictConfig) or not spec.get("name"):
        return cfg
    try:
        plugin = REWARDS.load(spec.name)
    except (KeyError, PluginError):  # unknown or broken: the builder's error says which
        return cfg
    keys = [k for k in spec if k not in ("name", "weight")]
    dropped = _unwritten_defaults("reward", "plugin", spec.name, plugin, keys, written)
    if not dropped:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in dropped:
            del cfg.reward[key]
    return cfg


def build_stage_objective(cfg: DictConfig, overrides: list[str] | None = None) -> Objective:
    """The objective ``method.objective.name`` with the other keys as its hyperparameters.

    A key the objective does not take is an error naming it and the valid keys, unless
    ``overrides`` is given and does not name it: then it is a default of the method config
    (``method=dpo`` brings ``beta``, ``label_smoothing``, ...) left behind by choosing another
    objective by name, and it is dropped with one info line.
    """
    hparams: dict[str, Any] = OmegaConf.to_container(cfg.method.objective, resolve=True)  # type: ignore[assignment]
    name = hparams.pop("name")
    written = written_keys(overrides, "method.objective")
    if written is not None:
        try:
            plugin = OBJECTIVES.load(name)
        except KeyError as exc:
            raise ConfigError(f"method.objective.name: {exc.args[0]}") from None
        dropped = _unwritten_defaults("method.objective", "objective", name, plugin,
                                      list(hparams), written)
        hparams = {k: v for k, v in hparams.items() if k not in dropped}
    return OBJECTIVES.build(name, hparams, "method.objective")


def _unwritten_defaults(node: str, kind: str, name: str, plugin: Any, keys: list[str],
                        written: set[str]) -> list[str]:
    """The ``keys`` under ``node`` that ``plugin`` takes no setting for and that the command
    line did not write (``written``): defaults of the config group left behind by naming
    another plugin, to drop; one info line names them."""
    valid, _, takes_any = settings_of(plugin)
    dropped = [] if takes_any else sorted(k for k in keys if k not in valid and k not in written)
    if dropped:
        log.info("%s: %s %r takes no %s; dropped the config's default%s (settings it takes: "
                 "%s)", node, kind, name, ", ".join(dropped), "s" if len(dropped) > 1 else "",
                 ", ".join(valid) or "none")
    return dropped


def _check_method(cfg: DictConfig, method_cls: type[Method], objective: Objective) -> str:
    """The objective fits the method, and the reference kind fits both; returns that kind."""
    if objective.data_kind not in method_cls.data_kinds:
        raise ConfigError(
            f"objective {objective.name!r} consumes {objective.data_kind!r} data but "
            f"method.module={cfg.method.module!r} handles {method_cls.data_kinds}")
    mode = reference_mode(cfg.method, cfg.model, objective)
    method_cls.check_reference(mode, objective)
    return mode


def _resumes(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether ``trainer.fit`` will restore a checkpoint (``ckpt_path=last`` without one
    starts fresh, see tests/test_resume.py)."""
    if cfg.get("ckpt_path") is None:
        return False
    return cfg.ckpt_path != "last" or (run_dir / "checkpoints" / "last.ckpt").exists()


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """CSV always (``<run_dir>/metrics.csv``); plus every logger configured under ``logger``."""
    loggers: list[Logger] = [RunCSVLogger(run_dir)]  # continued across resumes
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        try:
            loggers.append(instantiate(spec, save_dir=str(run_dir)))
        except Exception as exc:
            raise ConfigError(f"logger.{name} could not be created: {exc}") from exc
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every Lightning callback configured under ``callbacks`` (``conf/callbacks/``: a name ->
    a ``_target_`` spec; null entries are off)."""
    out: list[L.Callback] = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None:
            continue
        try:
            callback = instantiate(spec)
        except Exception as exc:
            raise ConfigError(f"callbacks.{name} could not be created: {exc}") from exc
        if not isinstance(callback, L.Callback):
            raise ConfigError(f"callbacks.{name}: {type(callback).__name__} is not a "
                              "lightning.Callback")
        out.append(callback)
    return out


def _callbacks(cfg: DictConfig, run_dir: Path, guard: NonFiniteGuard, objective: Objective,
               samples: ValidationSamples | None) -> list[L.Callback]:
    """ptlight's own callbacks (checkpoints, the non-finite guard, RNG state, preemption, the
    run record, progress, validation samples), then the user's from ``callbacks``."""
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                        enable_version_counter=False),  # always last.ckpt, never last-v1.ckpt
        guard, RngState(), Preemption(run_dir), RunRecord(cfg.method.module, objective.name),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TrainingBar())
    if samples is not None:
        callbacks.append(samples)
    return callbacks + build_callbacks(cfg)


# ---- after training -----------------------------------------------------------------------------
def _export_and_evaluate(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, module: Method,
                         policy: Any, tokenizer: Any, task: Task | None, report: dict[str, Any],
                         start_samples: list, samples: ValidationSamples | None,
                         guard: NonFiniteGuard) -> None:
    """HF export (rank 0; FSDP: the full state gathered first) and the gold evaluation."""
    export_dir = run_dir / "export"
    report["export_dir"] = str(export_dir)  # every rank: a next pipeline stage starts from it
    full_state = full_module_state(trainer, module)  # FSDP: gathered on rank 0 (all ranks call)
    if not trainer.is_global_zero:
        return
    export_model(policy, tokenizer, export_dir, cfg.model,
                 state_dict=None if full_state is None
                 else submodule_state(full_state, module, policy),
                 extras=lambda d: module.export_extras(d, full_state))
    if full_state is not None:  # the sharded modules cannot run on one rank: reload
        policy = load_export(export_dir, cfg.model)
        module = module.unsharded(policy, export_dir)
    log.info("rank %d of %d wrote %s", trainer.global_rank, trainer.world_size, export_dir)
    if task is not None and module.generates and cfg.eval.num_prompts > 0:
        after_samples: list = []
        report["after"] = gold_eval(policy, tokenizer, task, cfg.eval, keep=after_samples)
        if start_samples:  # the trained model vs the one it started from, prompt by prompt
            report["win_rate_vs_start"] = win_rate(after_samples, start_samples)
    elif task is not None and not module.generates:
        heldout = module.evaluate(tokenizer, task, cfg.eval)  # rm: held-out pairwise accuracy
        if heldout is not None:
            report["heldout"] = heldout
    report["global_step"] = trainer.global_step
    report["skipped_steps"] = guard.skipped
    report["world_size"] = trainer.world_size
    report["final_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report["validation_samples"] = samples.rows if samples is not None else []


def _write_run(cfg: DictConfig, run_dir: Path, report: dict[str, Any], trainer: L.Trainer
               ) -> None:
    """eval.json, the model card, samples.jsonl (+ a wandb table), report.md and its plots."""
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    write_model_card(Path(report["export_dir"]), cfg, report)
    log_samples(run_dir, report, trainer.loggers)
    write_run_report(run_dir)
