"""Compare the preference objectives on the bundled task: same SFT start, same budget, one sweep.

    python scripts/compare_objectives.py [--sft DIR] [--methods dpo,ipo,...] [--out DIR] \
        [-- trainer.max_steps=100 eval.num_prompts=200 ...]

Without ``--sft`` it first trains the start model with ``python -m ptlight method=sft
eval.before=false hydra.run.dir=<out>/sft <overrides>`` and uses ``<out>/sft/export``. Then it
launches every method as one Hydra multirun:

    python -m ptlight -m method=<m1>,<m2>,... model.path=<sft export> eval.before=false \
        hydra.sweep.dir=<out>/sweep <overrides>

(one job per method in ``<out>/sweep/<job number>/``), scores the SFT start once in-process with
the same ``eval`` settings, and prints and writes ``<out>/compare.md`` and ``<out>/compare.json``:
the gold reward, exact-match rate, final ``val/rewards/accuracies`` and wall time of each run,
the SFT start first, then the objectives by gold reward.

``--methods`` defaults to every ``conf/method/*.yaml`` whose ``module`` is ``preference``. The
overrides after ``--`` go to the sweep as given (sweep syntax such as ``method.objective.beta=
0.05,0.1`` multiplies the jobs); the SFT run and the start's scoring get only the plain ones that
do not touch ``method`` or ``hydra``. It does not tune anything per objective: each runs with
its ``conf/method`` defaults, so the table compares those defaults at this budget.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ptlight.config import config_dir, register_resolvers

COLUMNS = ("objective", "gold reward", "exact match", "val reward accuracy", "wall s")
KEYS = ("gold/reward", "gold/exact", "val/rewards/accuracies", "wall_time_s")
START = "sft (start)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Script options before ``--``; everything after it is a Hydra override."""
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT export dir (default: train one first)")
    parser.add_argument("--methods", help="comma list (default: every preference method)")
    parser.add_argument("--out", type=Path, help="output dir (default: outputs/compare-<time>)")
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    if args.sft and not (args.sft / "config.json").is_file():
        parser.error(f"--sft {args.sft}: not a model directory (no config.json); pass an export/")
    args.out = (args.out or Path("outputs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    return args


def compose_config(overrides: list[str]) -> DictConfig:
    """The root config exactly as ``python -m ptlight <overrides>`` composes it."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def plain_overrides(overrides: list[str]) -> list[str]:
    """The overrides that also make sense for SFT and for composing: no sweeps, method, hydra."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.input_line for o in parsed if not o.is_sweep_override()
            and o.key_or_group.split(".")[0] not in ("method", "hydra")]


def preference_methods(requested: str | None) -> list[str]:
    """``--methods`` checked against conf/method, or every method whose module is preference."""
    shipped = sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))
    preference = [m for m in shipped if compose_config([f"method={m}"]).method.module == "preference"]
    if requested is None:
        return preference
    methods = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in methods if m not in preference]
    if unknown or not methods:
        sys.exit(f"--methods: {unknown or requested!r} not among the preference methods {preference}")
    return methods


def launch(cmd: list[str]) -> int:
    """Run ``cmd`` with its output streamed to ours; returns its exit status."""
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def train_sft(out: Path, overrides: list[str]) -> Path:
    """``python -m ptlight method=sft`` into ``<out>/sft``; returns its export dir."""
    run_dir = out / "sft"
    status = launch([sys.executable, "-m", "ptlight", "method=sft", "eval.before=false",
                     f"hydra.run.dir={run_dir}", *overrides])
    if status:
        sys.exit(f"SFT run failed (exit {status}); see {run_dir}")
    return run_dir / "export"


def score_start(cfg: DictConfig) -> dict[str, Any]:
    """Gold metric of ``cfg.model.path`` with ``cfg.eval``, loaded as a training run loads it."""
    from ptlight.model.backbone import build_policy, load_tokenizer  # heavy imports, only when needed
    from ptlight.eval.gold import gold_eval
    from ptlight.tasks import resolve_task

    if not cfg.data.task:
        return {}
    tokenizer = load_tokenizer(cfg.model)
    return gold_eval(build_policy(cfg.model, tokenizer), tokenizer, resolve_task(cfg.data.task, args=cfg.data.get("task_args")),
                     cfg.eval)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir, labelled by its ``method=`` override plus any other swept value."""
    if not sweep_dir.is_dir():
        return []
    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    overrides = [list(OmegaConf.load(j / ".hydra" / "overrides.yaml")) for j in jobs]
    varying = set().union(*overrides) - set(overrides[0]).intersection(*overrides) if jobs else set()
    rows = []
    for job, ovr in zip(jobs, overrides):
        method = next(o.split("=", 1)[1] for o in ovr if o.startswith("method="))
        extra = [o for o in ovr if o in varying and not o.startswith("method=")]
        report = read_json(job / "eval.json")
        rows.append({
            "objective": method + (f" ({', '.join(extra)})" if extra else ""),
            "gold/reward": report.get("after", {}).get("gold/reward"),
            "gold/exact": report.get("after", {}).get("gold/exact"),
            "val/rewards/accuracies": report.get("final_metrics", {}).get("val/rewards/accuracies"),
            "wall_time_s": report.get("wall_time_s"),
            "global_step": report.get("global_step"),
            "job_dir": str(job),
            "status": "ok" if report else "failed",
        })
    return rows


def by_gold_reward(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best gold reward first; rows without one (failed jobs) last."""
    return sorted(rows, key=lambda r: (r["gold/reward"] is None, -(r["gold/reward"] or 0.0)))


def cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], footer: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        name = r["objective"] + (" (failed)" if r["status"] == "failed" else "")
        cells = [cell(r[k], 0 if k == "wall_time_s" else 3) for k in KEYS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n\n" + footer + "\n"


def budget(cfg: DictConfig) -> dict[str, Any]:
    return {"steps": cfg.trainer.max_steps, "batch_size": cfg.data.batch_size,
            "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
            "eval_prompts": cfg.eval.num_prompts, "task": cfg.data.task}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    methods = preference_methods(args.methods)  # fail on a bad --methods before any training
    plain = plain_overrides(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    sft = args.sft.resolve() if args.sft else train_sft(args.out, plain)
    sweep = [sys.executable, "-m", "ptlight", "-m", f"method={','.join(methods)}",
             f"model.path={sft}", "eval.before=false", f"hydra.sweep.dir={args.out / 'sweep'}",
             *args.overrides]
    status = launch(sweep)

    cfg = compose_config([f"model.path={sft}", *plain])
    start = score_start(cfg)
    sft_wall = read_json(sft.parent / "eval.json").get("wall_time_s")
    rows = [{"objective": START, "gold/reward": start.get("gold/reward"),
             "gold/exact": start.get("gold/exact"), "val/rewards/accuracies": None,
             "wall_time_s": sft_wall, "job_dir": str(sft), "status": "ok"}]
    rows += by_gold_reward(job_rows(args.out / "sweep"))

    b = budget(cfg)
    command = shlex.join(["python", "scripts/compare_objectives.py", *argv])
    footer = (f"Budget per objective: {b['steps']} steps × batch {b['batch_size']} "
              f"(× {b['accumulate_grad_batches']} accumulated); gold metric on "
              f"{b['eval_prompts']} held-out `{b['task']}` prompts, greedy. Command: `{command}`")
    table = markdown(rows, footer)
    print("\n" + table)
    (args.out / "compare.md").write_text(table)
    (args.out / "compare.json").write_text(json.dumps(
        {"rows": rows, "budget": b, "command": command, "sweep_command": shlex.join(sweep),
         "sft_export": str(sft)}, indent=2))
    print(f"wrote {args.out / 'compare.md'} and compare.json")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
