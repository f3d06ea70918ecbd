"""Run `python -m ptlight experiment=safety` (SFT -> DPO on the safety task), time it, and print
the table in docs/feedback.md: gold reward, refusal rate on harmful prompts and over-refusal on benign
ones, on held-out prompts, for the start model, after SFT and after DPO.

    python scripts/safety_report.py [extra overrides...]

Writes the run into ./outputs/safety-<time>/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def row(name: str, m: dict, wall: str, steps: str) -> str:
    return (f"| {name} | {m['gold/reward']:.3f} | {m['safety/refusal_rate']:.3f} | "
            f"{m['safety/over_refusal']:.3f} | {wall} | {steps} |")


def main() -> None:
    run_dir = Path("outputs") / f"safety-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "ptlight", "experiment=safety",
                           f"hydra.run.dir={run_dir}", *sys.argv[1:]], text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(proc.returncode)
    stages = json.loads((run_dir / "pipeline.json").read_text())
    print(f"\n`python -m ptlight experiment=safety` wall time: {wall:.0f} s (run dir {run_dir})\n")
    print("| model | gold reward | refusal rate (harmful) ↑ | over-refusal (benign) ↓ "
          "| stage wall s | steps |")
    print("|---|---|---|---|---|---|")
    seen_before = False
    for s in stages:
        if "before" in s and not seen_before:
            print(row(f"start (before {s['stage']})", s["before"], "", ""))
            seen_before = True
        print(row(f"after {s['stage']}", s["after"], f"{s['wall_time_s']:.0f}",
                  str(s["global_step"])))
    a = stages[-1]["after"]
    print(f"\n{a['num_prompts']} held-out prompts ({a['safety/num_harmful']:.0f} harmful, "
          f"{a['safety/num_benign']:.0f} benign), greedy decoding.")


if __name__ == "__main__":
    main()
