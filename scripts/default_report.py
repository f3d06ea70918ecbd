"""Run the default job (`python -m ptlight`), time it, and print the results table of docs/results.md.

    python scripts/default_report.py [extra overrides...]

Writes the run into ./outputs/report-<time>/ and prints a markdown table of the gold metric on
held-out prompts for the start model, after SFT and after DPO, with each stage's wall time
and the whole command's wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    run_dir = Path("outputs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "ptlight", f"hydra.run.dir={run_dir}",
                           *sys.argv[1:]], text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(proc.returncode)
    stages = json.loads((run_dir / "pipeline.json").read_text())
    print(f"\n`python -m ptlight` wall time: {wall:.0f} s (run dir {run_dir})\n")
    print("| model | gold reward | exact match | stage wall s | steps |")
    print("|---|---|---|---|---|")
    for s in stages:
        if "before" in s:
            b = s["before"]
            print(f"| start (before {s['stage']}) | {b['gold/reward']:.3f} | "
                  f"{b['gold/exact']:.3f} | | |")
        a = s["after"]
        print(f"| after {s['stage']} | {a['gold/reward']:.3f} | {a['gold/exact']:.3f} | "
              f"{s['wall_time_s']:.0f} | {s['global_step']} |")
    print(f"\n{stages[-1]['after']['num_prompts']} held-out prompts, greedy decoding.")


if __name__ == "__main__":
    main()
