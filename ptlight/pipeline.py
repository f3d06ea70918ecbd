"""The app's top level: one stage (``method=...``) or the pipeline of stages, and the tables
printed at the end.

Without ``method=...`` the app runs ``pipeline``: a list of stages (SFT then DPO by default),
each composed exactly as ``python -m ptlight method=<stage> ...`` would be, and each starting
from the previous stage's export (``model.path``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from ptlight.errors import ConfigError
from ptlight.report import write_pipeline_report
from ptlight.runtime.strategy import check_pipeline_launch
from ptlight.train import train_stage

log = logging.getLogger(__name__)


def _gold_row(name: str, metrics: dict[str, Any], wall: float | None) -> list[str]:
    exact = metrics.get("gold/exact")
    return [name, f"{metrics['gold/reward']:.3f}", "–" if exact is None else f"{exact:.3f}",
            "" if wall is None else f"{wall:.0f}"]


def print_heldout(report: dict[str, Any], prefix: str = "") -> None:
    """A reward model's pairwise accuracy on held-out pairs (``report["heldout"]``)."""
    held = report["heldout"]
    Console().print(f"{prefix}reward model accuracy {held['rm/accuracy']:.3f} on "
                    f"{held['num_pairs']} held-out pairs")


def print_gold_table(rows: list[list[str]], title: str) -> None:
    table = Table(title=title)
    for col in ("model", "gold reward", "exact match", "wall s"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


_EXPORT_REF = re.compile(r"\{export:([^}]+)\}")


def stage_overrides(stage: DictConfig, exports: dict[str, str], previous: str | None,
                    user_overrides: list[str]) -> list[str]:
    """The overrides one pipeline stage is composed with.

    ``method=<stage.method>``, the stage's own overrides with ``{export:<stage>}`` replaced by
    that earlier stage's export dir, the user's command-line overrides, and ``model.path``: the
    export of ``stage.model_from`` when set (a stage name, or null for the config's own model),
    else of the previous stage. So ``rm`` and ``ppo`` can both start from ``sft`` while ``ppo``
    reads its reward model from ``{export:rm}``.
    """
    def resolve(text: str) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1) not in exports:
                raise ConfigError(f"pipeline stage {stage.name!r}: {m.group(0)} names no earlier "
                                  f"stage (earlier: {', '.join(exports) or 'none'})")
            return exports[m.group(1)]
        return _EXPORT_REF.sub(sub, text)

    overrides = [f"method={stage.method}", *(resolve(o) for o in stage.overrides),
                 *user_overrides]
    if "model_from" in stage:
        source = stage.model_from
        if source is not None and source not in exports:
            raise ConfigError(f"pipeline stage {stage.name!r}: model_from={source!r} names no "
                              f"earlier stage (earlier: {', '.join(exports) or 'none'})")
        start = exports[source] if source is not None else None
    else:
        start = previous
    if start is not None:
        overrides.append(f"model.path={start}")
    return overrides


def run_pipeline(cfg: DictConfig, run_dir: Path, user_overrides: list[str]) -> list[dict]:
    """Run ``cfg.pipeline`` stage by stage (see :func:`stage_overrides` for what each starts from)."""
    from hydra import compose  # the caller holds an initialised Hydra (the app or a test)

    check_pipeline_launch(cfg.trainer)
    reports, previous, exports = [], None, {}
    for i, stage in enumerate(cfg.pipeline):
        overrides = stage_overrides(stage, exports, previous, user_overrides)
        stage_cfg = compose(config_name="config", overrides=overrides)
        report = train_stage(stage_cfg, run_dir / f"{i}-{stage.name}", overrides)
        reports.append({"stage": stage.name, **report})
        previous = exports[stage.name] = report["export_dir"]
    if rank_zero_only.rank != 0:  # torchrun/srun: every rank runs the stages; one reports
        return reports
    rows = []
    for r in reports:
        if "before" in r:
            rows.append(_gold_row("start (before " + r["stage"] + ")", r["before"], None))
        if "after" in r:
            rows.append(_gold_row("after " + r["stage"], r["after"], r["wall_time_s"]))
        if "heldout" in r:
            print_heldout(r, f"{r['stage']}: ")
    if rows:
        print_gold_table(rows, f"gold metric on {cfg.eval.num_prompts} held-out prompts")
    (run_dir / "pipeline.json").write_text(json.dumps(reports, indent=2))
    write_pipeline_report(run_dir, reports)
    return reports


def run(cfg: DictConfig, run_dir: Path, user_overrides: list[str]) -> float | None:
    """Entry of the app: one stage when ``method`` is set, otherwise the pipeline.

    Returns the final ``sweep_metric`` (default ``val/loss``; what a Hydra sweeper such as
    Optuna optimises), or None with a warning naming the metrics there are.
    """
    if cfg.method is not None:
        check_pipeline_launch(cfg.trainer, pipeline=False)  # refuses a DDP multirun
        report = train_stage(cfg, run_dir, user_overrides)
        if "heldout" in report:
            print_heldout(report)
        if "after" in report and "before" in report:
            print_gold_table([_gold_row("before", report["before"], None),
                              _gold_row("after", report["after"], report["wall_time_s"])],
                             f"gold metric on {cfg.eval.num_prompts} held-out prompts")
    else:
        report = run_pipeline(cfg, run_dir, user_overrides)[-1]
    metrics = report.get("final_metrics", {})  # empty on ranks other than 0
    if metrics and cfg.sweep_metric not in metrics:
        log.warning("sweep_metric=%s was not logged; final metrics: %s", cfg.sweep_metric,
                    ", ".join(sorted(metrics)))
    return metrics.get(cfg.sweep_metric)
