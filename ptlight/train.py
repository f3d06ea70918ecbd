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
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ptlight.backbone import (AdapterReference, build_policy, export_model, frozen_copy,
                              has_adapters, load_tokenizer, lora_settings)
from ptlight.data.module import PtlDataModule
from ptlight.errors import ConfigError
from ptlight.evaluate import ValidationSamples, gold_eval, log_samples
from ptlight.methods import get_method
from ptlight.methods.preference import REFERENCE_MODES
from ptlight.objectives import Objective, build_objective
from ptlight.report import write_model_card, write_pipeline_report, write_run_report


# The CSV logger shares the stage dir with config.yaml and checkpoints; only its own
# metrics.csv is replaced, so its "directory not empty" warning is noise.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """CSV always (``<run_dir>/metrics.csv``); plus every logger configured under ``logger``."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
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


def train_stage(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one method on one config; returns the eval report (also written to eval.json)."""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
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
    tokenizer = load_tokenizer(cfg.model)
    datamodule = PtlDataModule(cfg.data, tokenizer, objective.data_kind)
    datamodule.setup()

    policy = build_policy(cfg.model, tokenizer)
    reference = None if reference_mode == "none" else (
        AdapterReference(policy) if has_adapters(policy) else frozen_copy(policy))
    task = cfg.data.task
    report: dict[str, Any] = {"method": cfg.method.module, "objective": objective.name,
                              "data": datamodule.report()}
    if task and cfg.eval.before:
        report["before"] = gold_eval(policy, tokenizer, task, cfg.eval)

    extra = method_cls.extra_args(cfg, tokenizer) if hasattr(method_cls, "extra_args") else {}
    module = method_cls(policy=policy, objective=objective, optim=cfg.method.optim,
                        reference=reference, reference_mode=reference_mode, **extra)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint.every_n_train_steps),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    samples = (ValidationSamples(tokenizer, task, cfg.eval, objective.name)
               if task and cfg.eval.val_samples else None)
    if samples is not None:
        callbacks.append(samples)
    trainer: L.Trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    export_dir = run_dir / "export"
    if trainer.is_global_zero:
        export_model(policy, tokenizer, export_dir, cfg.model)
        if task:
            report["after"] = gold_eval(policy, tokenizer, task, cfg.eval)
        report["export_dir"] = str(export_dir)
        report["global_step"] = trainer.global_step
        report["final_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        report["wall_time_s"] = round(time.time() - started, 1)
        report["validation_samples"] = samples.rows if samples is not None else []
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        write_model_card(export_dir, cfg, report)
        log_samples(run_dir, report, trainer.loggers)  # samples.jsonl (+ wandb table)
        write_run_report(run_dir)  # report.md + PNG plots
    return report


def _gold_row(name: str, metrics: dict[str, Any], wall: float | None) -> list[str]:
    return [name, f"{metrics['gold/reward']:.3f}", f"{metrics['gold/exact']:.3f}",
            "" if wall is None else f"{wall:.0f}"]


def print_gold_table(rows: list[list[str]], title: str) -> None:
    table = Table(title=title)
    for col in ("model", "gold reward", "exact match", "wall s"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def run_pipeline(cfg: DictConfig, run_dir: Path, user_overrides: list[str]) -> list[dict]:
    """Run ``cfg.pipeline`` stage by stage; each stage starts from the previous export."""
    from hydra import compose  # the caller holds an initialised Hydra (the app or a test)

    reports, previous = [], None
    for i, stage in enumerate(cfg.pipeline):
        overrides = [f"method={stage.method}", *stage.overrides, *user_overrides]
        if previous is not None:
            overrides.append(f"model.path={previous}")
        stage_cfg = compose(config_name="config", overrides=overrides)
        report = train_stage(stage_cfg, run_dir / f"{i}-{stage.name}")
        reports.append({"stage": stage.name, **report})
        previous = report["export_dir"]
    rows = []
    for r in reports:
        if "before" in r:
            rows.append(_gold_row("start (before " + r["stage"] + ")", r["before"], None))
        if "after" in r:
            rows.append(_gold_row("after " + r["stage"], r["after"], r["wall_time_s"]))
    if rows:
        print_gold_table(rows, f"gold metric on {cfg.eval.num_prompts} held-out prompts")
    (run_dir / "pipeline.json").write_text(json.dumps(reports, indent=2))
    write_pipeline_report(run_dir, reports)
    return reports


def run(cfg: DictConfig, run_dir: Path, user_overrides: list[str]) -> float | None:
    """Entry of the app: one stage when ``method`` is set, otherwise the pipeline.

    Returns the final ``val/loss`` (what a Hydra sweeper optimises), when there is one.
    """
    if cfg.method is not None:
        report = train_stage(cfg, run_dir)
        if "after" in report and "before" in report:
            print_gold_table([_gold_row("before", report["before"], None),
                              _gold_row("after", report["after"], report["wall_time_s"])],
                             f"gold metric on {cfg.eval.num_prompts} held-out prompts")
    else:
        report = run_pipeline(cfg, run_dir, user_overrides)[-1]
    return report.get("final_metrics", {}).get("val/loss")
