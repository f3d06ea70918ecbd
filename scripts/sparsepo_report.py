"""SparsePO and TDPO against DPO on a bundled task: same SFT start, same budget.

    python scripts/sparsepo_report.py [--sft DIR] [--runs dpo,tdpo,...] [--out DIR] \
        [-- data.task=sort trainer.max_steps=100 eval.num_prompts=200 ...]

Without ``--sft`` it first trains the start model (``python -m ptlight method=sft`` with the
default job's 250 steps, whatever ``trainer.max_steps`` the runs get) and uses its export. Then each run below is one
``python -m ptlight <run> model.path=<sft export> eval.before=false hydra.run.dir=<out>/<run>
<overrides>``, one after another (so wall times do not share the CPU):

- ``dpo``: ``method=dpo`` (its shipped reference mode);
- ``tdpo``: ``method=tdpo`` (TDPO2, α 0.5);
- ``sparsepo-learnable``: ``method=sparsepo`` (shared learnable masks);
- ``sparsepo-independent``: learnable, ``shared_masks=false``;
- ``sparsepo-activation``: ``method.objective.mask=activation``.

It prints and writes ``<out>/sparsepo.md`` and ``<out>/sparsepo.json`` (with the date, machine
and versions): gold reward and exact-match rate of the SFT start and of each run, the mask
sparsity and mean mask at the last validation (``val/mask/sparsity_chosen``,
``…_rejected``, ``val/mask/mean``; "–" for objectives without a mask: DPO's and TDPO's masks
are ≡ 1) and the wall time. Nothing is tuned per objective: every run uses its
``conf/method`` defaults, so when a mask does not help, the table shows that too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("compare_objectives",
                                               SCRIPTS / "compare_objectives.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)  # type: ignore[union-attr]

RUNS = {
    "dpo": ["method=dpo"],
    "tdpo": ["method=tdpo"],
    "sparsepo-learnable": ["method=sparsepo"],
    "sparsepo-independent": ["method=sparsepo", "method.objective.shared_masks=false"],
    "sparsepo-activation": ["method=sparsepo", "method.objective.mask=activation"],
}
COLUMNS = ("run", "gold reward", "exact match", "mask sparsity (chosen / rejected)",
           "mask mean", "wall s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT export dir (default: train one first)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(RUNS))
    parser.add_argument("--out", type=Path, help="output dir (default: outputs/sparsepo-<time>)")
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        parser.error(f"--runs: {unknown or args.runs} not among {list(RUNS)}")
    if args.sft and not (args.sft / "config.json").is_file():
        parser.error(f"--sft {args.sft}: not a model directory (no config.json)")
    args.out = (args.out or Path("outputs") / f"sparsepo-{time.strftime('%Y%m%d-%H%M%S')}"
                ).resolve()
    return args


def row(name: str, report: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One table row from a run's eval.json (``{}``: the run failed)."""
    final = report.get("final_metrics", {})
    after = report.get("after", {})
    return {"run": name, "gold/reward": after.get("gold/reward"),
            "gold/exact": after.get("gold/exact"),
            "mask/sparsity_chosen": final.get("val/mask/sparsity_chosen"),
            "mask/sparsity_rejected": final.get("val/mask/sparsity_rejected"),
            "mask/mean": final.get("val/mask/mean"),
            "kl/chosen": final.get("val/kl/chosen"),
            "wall_time_s": report.get("wall_time_s"), "global_step": report.get("global_step"),
            "run_dir": str(run_dir), "status": "ok" if report else "failed"}


def markdown(rows: list[dict[str, Any]], footer: str) -> str:
    c = compare.cell
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        name = r["run"] + (" (failed)" if r["status"] == "failed" else "")
        sparsity = ("–" if r.get("mask/sparsity_chosen") is None else
                    f"{r['mask/sparsity_chosen']:.3f} / {c(r.get('mask/sparsity_rejected'), 3)}")
        lines.append("| " + " | ".join([
            name, c(r["gold/reward"], 3), c(r["gold/exact"], 3), sparsity,
            c(r.get("mask/mean"), 3), c(r["wall_time_s"], 0)]) + " |")
    return "\n".join(lines) + "\n\n" + footer + "\n"


def versions() -> dict[str, str]:
    import lightning
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": platform.platform(), "processor": platform.processor() or "unknown"}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plain = compare.plain_overrides(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    # the start is the default job's SFT stage (its 250 steps): the runs' step budget is theirs
    sft_overrides = [o for o in plain if not o.startswith("trainer.max_steps=")]
    sft = args.sft.resolve() if args.sft else compare.train_sft(args.out, sft_overrides)
    failed = 0
    rows = []
    for name in args.runs:
        run_dir = args.out / name
        status = compare.launch([sys.executable, "-m", "ptlight", *RUNS[name],
                                 f"model.path={sft}", "eval.before=false",
                                 f"hydra.run.dir={run_dir}", *args.overrides])
        failed |= status != 0
        rows.append(row(name, compare.read_json(run_dir / "eval.json"), run_dir))

    cfg = compare.compose_config([f"model.path={sft}", *plain])
    start = compare.score_start(cfg)
    rows.insert(0, {"run": compare.START, "gold/reward": start.get("gold/reward"),
                    "gold/exact": start.get("gold/exact"), "status": "ok", "run_dir": str(sft),
                    "wall_time_s": compare.read_json(sft.parent / "eval.json").get(
                        "wall_time_s")})
    b = compare.budget(cfg)
    command = shlex.join(["python", "scripts/sparsepo_report.py", *argv])
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    v = versions()
    footer = (f"Budget per run: {b['steps']} steps × batch {b['batch_size']} "
              f"(× {b['accumulate_grad_batches']} accumulated); gold metric on "
              f"{b['eval_prompts']} held-out `{b['task']}` prompts, greedy. Mask sparsity: share "
              "of mask values exactly 0 at the last validation. "
              f"{stamp}, {v['machine']}, torch {v['torch']}, transformers "
              f"{v['transformers']}. Command: `{command}`")
    table = markdown(rows, footer)
    print("\n" + table)
    (args.out / "sparsepo.md").write_text(table)
    (args.out / "sparsepo.json").write_text(json.dumps(
        {"date": stamp, "versions": v, "rows": rows, "budget": b, "command": command,
         "sft_export": str(sft)}, indent=2))
    print(f"wrote {args.out / 'sparsepo.md'} and sparsepo.json")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
