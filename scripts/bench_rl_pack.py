"""The RL methods' scoring packed (each prompt once with its completions as branches, no
padding) against padded rows, whole process, on the arith task from an SFT export.

    python scripts/bench_rl_pack.py                        # SFT 1200 steps, then grpo both ways
    python scripts/bench_rl_pack.py --method ppo --steps 400
    python scripts/bench_rl_pack.py --sft /path/to/export  # reuse an SFT export

Trains the SFT export first unless ``--sft`` names one (``experiment=grpo``'s SFT stage:
1200 steps at lr 1e-3, no gold evaluation), then runs ``python -m ptlight method=<method>
data=arith model.path=<export> trainer.max_steps=<steps>`` with ``method.rollout.pack``
(``method.ppo.pack`` for ppo) false and true, alternating, ``--repeats`` times each, each in
its own process. Prints a markdown table: wall time and peak RSS of the process, the
``trainer.fit`` time, the time the rollouts spent generating (``train/rollout/seconds``
summed), and the gold figures after training, with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], log: Path) -> tuple[float, float]:
    """``python -m ptlight <args>``: (wall seconds, its peak RSS in GB)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ptlight", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"ptlight {' '.join(args)} failed; see {log}")
    return wall, usage.ru_maxrss / 1e6  # KB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="grpo", help="an RL method config (grpo, rloo, ppo, ...)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of the RL run")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch")
    p.add_argument("--sft", help="an SFT export to start from (default: train one)")
    p.add_argument("--sft-steps", type=int, default=1200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=200, help="gold evaluation prompts")
    p.add_argument("--out", help="run directories (default: a temporary one)")
    args = p.parse_args()
    import torch
    import transformers

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_rl_pack_"))
    out.mkdir(parents=True, exist_ok=True)
    sft = args.sft
    if sft is None:
        run(["method=sft", "data=arith", f"trainer.max_steps={args.sft_steps}",
             "method.optim.lr=1.0e-3", "eval.num_prompts=0", f"hydra.run.dir={out / 'sft'}"],
            out / "sft.log")
        sft = str(out / "sft" / "export")
    key = "method.ppo.pack" if args.method == "ppo" else "method.rollout.pack"
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"method={args.method} data=arith, {args.steps} steps of {args.batch_size} prompts")
    print(f"| {key} | wall s | peak RSS GB | fit s | generating s | gold reward | exact |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for i in range(args.repeats):
        for pack in ("false", "true"):
            run_dir = out / f"{args.method}_{pack}_{i}"
            wall, rss = run([f"method={args.method}", "data=arith", f"model.path={sft}",
                             f"trainer.max_steps={args.steps}", "eval.before=false",
                             f"data.batch_size={args.batch_size}",
                             f"eval.num_prompts={args.eval_prompts}", f"{key}={pack}",
                             f"hydra.run.dir={run_dir}"], out / f"{run_dir.name}.log")
            report = json.loads((run_dir / "eval.json").read_text())
            with (run_dir / "metrics.csv").open() as f:  # the group methods log it
                seconds = [float(r["train/rollout/seconds"]) for r in csv.DictReader(f)
                           if r.get("train/rollout/seconds")]
            generating = f"{sum(seconds):.1f}" if seconds else "–"
            after = report.get("after", {})
            print(f"| {pack} | {wall:.1f} | {rss:.2f} | {report['fit_time_s']:.1f} | "
                  f"{generating} | {after.get('gold/reward', float('nan')):.3f} | "
                  f"{after.get('gold/exact', float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
