"""The whole pipeline, top to bottom, without branching on method names.

    cfg -> objective (by name, from entry points; hyperparameters checked)
        -> tokenizer -> DataModule (rows checked and tokenized)
        -> policy (+ frozen reference) -> method LightningModule -> lightning.Trainer
        -> HF export + gold eval -> run dir (+ model card, samples.jsonl, report.md + plots)

Everything that can fail on the user's config (objective name and keys, objective vs method
data kind, reference availability, data rows) fails before model weights are loaded.

Without ``method=...`` the app runs ``pipeline``: a list of stages (SFT then DPO by default),
each composed exactly as ``python -m ptlight method=<stage> ...`` would be, and each starting
from the previous stage's export (``model.path``).
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
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ptlight.model.backbone import (AdapterReference, build_policy, export_model, frozen_copy,
                              has_adapters, load_export, load_tokenizer, lora_settings)
from ptlight.runtime.callbacks import AtomicCheckpointIO, NonFiniteGuard, Preemption, RngState
from ptlight.engine.cpu_bf16 import precision_plugins
from ptlight.data.module import PtlDataModule
from ptlight.runtime.devices import configure_cuda, resolve_trainer, uses_cuda
from ptlight.errors import ConfigError
from ptlight.eval.gold import ValidationSamples, gold_eval, log_samples, win_rate
from ptlight.engine.lean import install_lean_mlp
from ptlight.engine.memory import pin_mmap_threshold
from ptlight.engine.offload import offload_directory
from ptlight.methods import get_method
from ptlight.methods.preference import REFERENCE_MODES
from ptlight.objectives import Objective, build_objective
from ptlight.report import write_model_card, write_run_report
from ptlight.runtime.rundir import RunCSVLogger, RunRecord, checkpoint_to_resume, guard_run_dir
from ptlight.runtime.strategy import (build_strategy, fsdp_without_rank0_generation,
                                      full_module_state, is_fsdp, submodule_state)
from ptlight.runtime.validate import check_config

log = logging.getLogger(__name__)


# PPO (manual optimisation) checkpoints after its optimiser steps, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


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


def _objective(cfg: DictConfig) -> Objective:
    hparams: dict[str, Any] = OmegaConf.to_container(cfg.method.objective, resolve=True)  # type: ignore[assignment]
    name = hparams.pop("name")
    try:
        return build_objective(name, hparams)
    except KeyError as exc:
        raise ConfigError(f"method.objective.name: {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method.objective: {exc}") from exc


def _reference_mode(cfg: DictConfig, objective: Objective) -> str:
    mode = cfg.method.reference
    if mode not in REFERENCE_MODES:
        raise ConfigError(f"method.reference={mode!r}; use one of {REFERENCE_MODES}")
    if objective.needs_reference and mode == "none":
        raise ConfigError(
            f"objective {objective.name!r} needs a reference model but method.reference=none; "
            "use method.reference=copy or precompute"
        )
    lora = lora_settings(cfg.model) is not None
    if mode == "adapter" and not lora:
        raise ConfigError(
            "method.reference=adapter needs LoRA (model.lora.enabled=true); without adapters "
            "use method.reference=copy or precompute"
        )
    if not objective.needs_reference:
        return "none"
    return "adapter" if lora and mode == "copy" else mode  # LoRA: no second copy of the weights


def _resumes(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether ``trainer.fit`` will restore a checkpoint (``ckpt_path=last`` without one
    starts fresh, see tests/test_resume.py)."""
    if cfg.get("ckpt_path") is None:
        return False
    return cfg.ckpt_path != "last" or (run_dir / "checkpoints" / "last.ckpt").exists()


@guard_run_dir  # ckpt_path checked, run dir locked, a failed resume leaves it as it was
def train_stage(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one method on one config; returns the eval report (also written to eval.json)."""
    started = time.time()
    check_config(cfg)  # before anything is written or loaded (ptlight.runtime.validate)
    if cfg.get("malloc_mmap_threshold"):  # opt-in: lower peak RSS, slower steps (ptlight.engine.memory)
        pin_mmap_threshold(int(cfg.malloc_mmap_threshold))
    run_dir.mkdir(parents=True, exist_ok=True)
    # trainer.accelerator/precision "auto" settled for this machine, and checked against it
    cfg = OmegaConf.merge(cfg, {"trainer": resolve_trainer(cfg.trainer)})
    if uses_cuda(cfg.trainer):
        configure_cuda(cfg.get("cudnn_attention", False))
    if cfg.get("optimizer_offload") and uses_cuda(cfg.trainer):
        raise ConfigError("optimizer_offload streams CPU parameters' AdamW state through a "
                          "file; this run trains on a CUDA GPU: set optimizer_offload=null")
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    objective = _objective(cfg)
    method_cls = get_method(cfg.method.module)
    if objective.data_kind not in method_cls.data_kinds:
        raise ConfigError(
            f"objective {objective.name!r} consumes {objective.data_kind!r} data but "
            f"method.module={cfg.method.module!r} handles {method_cls.data_kinds}"
        )
    reference_mode = _reference_mode(cfg, objective)
    offload = cfg.get("optimizer_offload")
    if offload:  # checked before any weights load
        offload = offload_directory(offload)
    # bf16-mixed on a CPU without bf16 units: fp32 GEMMs on bf16-rounded operands (cpu_bf16)
    trainer_cfg, precision = precision_plugins(cfg.trainer, cfg.cpu_bf16)
    guard = NonFiniteGuard(cfg.nonfinite.policy, cfg.nonfinite.max_consecutive,
                           checkpoint_dir=str(run_dir / "checkpoints"))
    tokenizer = load_tokenizer(cfg.model)
    # Method hooks (all optional): which data shape feeds the objective (rm: pairwise rows for
    # a "scores" objective; ppo: prompts for a "rollout" one), constructed extras (ppo: the
    # reward plugin), whether the trained model generates (the gold metric needs it).
    data_kind = (method_cls.data_kind_for(cfg.method, objective)
                 if hasattr(method_cls, "data_kind_for") else objective.data_kind)
    extra = method_cls.extra_args(cfg, tokenizer) if hasattr(method_cls, "extra_args") else {}
    generates = getattr(method_cls, "generates", True)
    datamodule = PtlDataModule(cfg.data, tokenizer, data_kind)
    datamodule.setup()

    policy = build_policy(cfg.model, tokenizer)
    if reference_mode == "none":
        reference = None
    elif has_adapters(policy):
        reference = AdapterReference(policy)
    elif (reference_mode == "precompute" and not is_fsdp(cfg.trainer.get("strategy"))
          and not _resumes(cfg, run_dir)):
        # A fresh run's policy is the reference until its first step, which comes after the
        # precompute: it scores the reference itself, and no copy of the weights is made
        # (PreferenceMethod.on_fit_start). A resumed run restores trained weights into the
        # policy first, so it keeps a frozen copy of the starting weights, as "copy" does.
        reference = policy
    else:
        reference = frozen_copy(policy)
    task = cfg.data.task
    report: dict[str, Any] = {"method": cfg.method.module, "objective": objective.name,
                              "data": datamodule.report()}
    start_samples: list = []  # the start model's gold-scored generations (eval.before)
    if task and cfg.eval.before and generates and rank_zero_only.rank == 0:
        report["before"] = gold_eval(policy, tokenizer, task, cfg.eval, keep=start_samples)

    optim = cfg.method.optim
    if offload:  # AdamW's moments in a file (ptlight.engine.offload)
        optim = OmegaConf.create({**OmegaConf.to_container(optim, resolve=True),
                                  "offload_dir": offload})
    module = method_cls(policy=policy, objective=objective, optim=optim,
                        reference=reference, reference_mode=reference_mode, **extra)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                        enable_version_counter=False),  # always last.ckpt, never last-v1.ckpt
        guard, RngState(),
        Preemption(run_dir), RunRecord(cfg.method.module, objective.name),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    samples = (ValidationSamples(tokenizer, task, cfg.eval, objective.name)
               if task and cfg.eval.val_samples and generates
               and not fsdp_without_rank0_generation(cfg.trainer) else None)
    if samples is not None:
        callbacks.append(samples)
    overrides = method_cls.trainer_overrides(cfg) if hasattr(method_cls, "trainer_overrides") else {}
    trainer_cfg, strategy = build_strategy(trainer_cfg, policy)  # FSDP: wrap policy resolved
    if not strategy and not uses_cuda(trainer_cfg):
        install_lean_mlp(policy)  # CPU: LFM2's MLPs keep 2 activations instead of 4 (ptlight.engine.lean)
    trainer: L.Trainer = instantiate(
        trainer_cfg, default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir),
        callbacks=callbacks, plugins=[AtomicCheckpointIO(), *precision], **strategy,
        **overrides,
    )
    fit_started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint_to_resume(cfg, run_dir))
    fit_time = round(time.time() - fit_started, 1)

    export_dir = run_dir / "export"
    report["export_dir"] = str(export_dir)  # every rank: a next pipeline stage starts from it
    full_state = full_module_state(trainer, module)  # FSDP: gathered on rank 0 (all ranks call)
    if trainer.is_global_zero:
        extras = getattr(module, "export_extras", None)  # rm, ppo: their heads
        export_model(policy, tokenizer, export_dir, cfg.model,
                     state_dict=None if full_state is None
                     else submodule_state(full_state, module, policy),
                     extras=None if extras is None else lambda d: extras(d, full_state))
        if full_state is not None:  # the sharded modules cannot run on one rank: reload
            policy = load_export(export_dir, cfg.model)
            if hasattr(module, "unsharded"):  # rm: its reward model rebuilt around it
                module = module.unsharded(policy, export_dir)
        log.info("rank %d of %d wrote %s", trainer.global_rank, trainer.world_size, export_dir)
        if task and generates:
            after_samples: list = []
            report["after"] = gold_eval(policy, tokenizer, task, cfg.eval, keep=after_samples)
            if start_samples:  # the trained model vs the one it started from, prompt by prompt
                report["win_rate_vs_start"] = win_rate(after_samples, start_samples)
        elif task and hasattr(module, "evaluate"):  # rm: held-out pairwise accuracy
            report["heldout"] = module.evaluate(tokenizer, task, cfg.eval)
        report["global_step"] = trainer.global_step
        report["skipped_steps"] = guard.skipped
        report["world_size"] = trainer.world_size
        report["final_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        report["wall_time_s"] = round(time.time() - started, 1)
        report["fit_time_s"] = fit_time  # trainer.fit alone (no loading, no gold evals)
        report["validation_samples"] = samples.rows if samples is not None else []
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        write_model_card(export_dir, cfg, report)
        log_samples(run_dir, report, trainer.loggers)  # samples.jsonl (+ wandb table)
        write_run_report(run_dir)  # report.md + PNG plots
    trainer.strategy.barrier("export")  # other ranks wait: a next stage reads this export
    return report
