"""Active vs uniform sampling at the same budget: DPO from one SFT model on the bundled task.

    python scripts/active_report.py [--sft SFT_EXPORT] [-- extra overrides for both runs]

Without ``--sft`` it first trains the SFT model (``method=sft trainer.max_steps=250``, as the
default job's first stage). Then two DPO runs start from it with the same seed, steps and batch
size (the budget: ``trainer.max_steps`` x ``data.batch_size`` training pairs): uniform
shuffling, and ``+data/sampler=active`` (predictive entropy of the policy's samples,
conf/data/sampler/active.yaml). Prints the table in docs/feedback.md: gold reward and exact match on the
same held-out prompts, fit and wall time of each run, and the active sampler's priorities
(mean over its pools vs mean of the drawn examples). Runs go to ./outputs/active-<time>/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ACTIVE = ["+data/sampler=active", "data.sampler.max_new_tokens=24"]


def run(args: list[str], run_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ptlight", *args, f"hydra.run.dir={run_dir}",
                           "trainer.enable_progress_bar=false"], text=True)
    if proc.returncode:
        sys.exit(proc.returncode)
    return json.loads((run_dir / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", help="SFT export to start from (default: train one)")
    parser.add_argument("--steps", type=int, default=100, help="DPO steps of each run")
    parser.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    parser.add_argument("--report-only", metavar="ROOT",
                        help="print the table and plot of finished runs in ROOT")
    args = parser.parse_args()
    if args.report_only:
        root = Path(args.report_only)
        sft = str(root / "sft" / "export")
        reports = {name: json.loads((root / d / "eval.json").read_text())
                   for name, d in (("uniform", "uniform"), ("active (entropy)", "active"))}
    else:
        root = Path("outputs") / f"active-{time.strftime('%Y%m%d-%H%M%S')}"
        sft = args.sft
        if sft is None:
            run(["method=sft", "trainer.max_steps=250", "eval.before=false", *args.extra],
                root / "sft")
            sft = str(root / "sft" / "export")
        common = ["method=dpo", f"model.path={sft}", f"trainer.max_steps={args.steps}",
                  "eval.before=false", *args.extra]
        reports = {"uniform": run(common, root / "uniform"),
                   "active (entropy)": run([*common, *ACTIVE], root / "active")}
    from ptlight.report import plot_gold

    points = [(name, r["after"]) for name, r in reports.items()]
    if (root / "sft" / "eval.json").exists():
        points.insert(0, ("sft (start)", json.loads((root / "sft" / "eval.json").read_text())["after"]))
    plot_gold(points, f"DPO {args.steps} steps: uniform vs active sampling", root / "active.png")
    print(f"\nDPO {args.steps} steps from {sft} (runs in {root})\n")
    print("| sampling | gold reward | exact match | fit s | wall s |")
    print("|---|---|---|---|---|")
    for name, r in reports.items():
        a = r["after"]
        print(f"| {name} | {a['gold/reward']:.3f} | {a['gold/exact']:.3f} | "
              f"{r['fit_time_s']:.0f} | {r['wall_time_s']:.0f} |")
    lines = [json.loads(x) for x in (root / "active" / "sampler.jsonl").read_text().splitlines()]
    pool = sum(x["sampler/priority_mean"] for x in lines) / len(lines)
    drawn = sum(x["sampler/priority_selected"] for x in lines) / len(lines)
    ent = sum(x["sampler/entropy"] / x["max_entropy"] for x in lines) / len(lines)
    print(f"\nactive sampler: {len(lines)} refreshes; mean priority (predictive entropy, nats) "
          f"of the pools {pool:.2f}, of the drawn examples {drawn:.2f}; sampling entropy "
          f"{ent:.2f} of uniform's. {r['after']['num_prompts']} held-out prompts, greedy. "
          f"Plot: {root / 'active.png'}")


if __name__ == "__main__":
    main()
