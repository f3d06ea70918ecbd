"""AI feedback on the bundled task, measured against its gold reward.

    python scripts/label_report.py --sft SFT_EXPORT [--prompts 512] [--steps 100]

1. ``python -m ptlight.label`` with the gold judge: the SFT policy samples 4 completions for
   each of ``--prompts`` train prompts; the best and worst under the judge become a pair.
2. The same with the constitution LLM judge, the SFT model itself as the judge (lfm2-tiny,
   3.6 M parameters, never trained to judge: this measures the mechanics and position bias, not
   a useful judge), on a quarter of the prompts.
3. DPO from the SFT model on the gold-labelled on-policy pairs (``data.path=`` the file),
   ``--steps`` steps, evaluated on the task's held-out prompts.

Prints the tables in docs/feedback.md: each judge's gold check (how often its chosen completion has a
higher gold reward than its rejected one; ties; the tie rate of the LLM judge's both-order
verdicts) with wall times, and the gold metric of the SFT model and of DPO on the labelled data.
Runs go to ./outputs/label-<time>/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sh(module: str, args: list[str], may_fail: bool = False) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], text=True)
    if proc.returncode and not may_fail:
        sys.exit(proc.returncode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", required=True, help="SFT export of the bundled sort task")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--root", help="resume into this dir: stages whose output exists are kept")
    args = parser.parse_args()
    root = Path(args.root or Path("outputs") / f"label-{time.strftime('%Y%m%d-%H%M%S')}")
    if not (root / "gold" / "label.json").exists():
        sh("ptlight.label", [f"model.path={args.sft}", f"label.num_prompts={args.prompts}",
                             f"hydra.run.dir={root / 'gold'}"])
    sh("ptlight.label", [f"model.path={args.sft}", f"label.num_prompts={args.prompts // 4}",
                         "judge=constitution", f"judge.path={args.sft}",
                         f"hydra.run.dir={root / 'constitution'}"], may_fail=True)
    sh("ptlight", ["method=dpo", f"model.path={args.sft}", f"trainer.max_steps={args.steps}",
                   f"data.path={root / 'gold' / 'pairwise.jsonl'}", "data.task=sort",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={root / 'dpo'}"])
    print(f"\nruns in {root}\n")
    print("| judge | prompts | pairs | skipped (all tied) | gold agreement | gold tie | "
          "gold disagreement | gold chosen | gold rejected | gold all samples | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("gold", "constitution"):
        m = json.loads((root / name / "label.json").read_text())
        c = m["gold_check"]
        print(f"| {name} | {m['num_prompts']} | {m['rows']} | {sum(m['skipped'].values())} | "
              + " | ".join("–" if c.get(k) is None else f"{c[k]:.3f}" for k in
                           ("agreement", "tie", "disagreement", "gold/chosen", "gold/rejected",
                            "gold/samples"))
              + f" | {m['wall_time_s']:.0f} |")
    stats = json.loads((root / "constitution" / "label.json").read_text()).get("judge_stats")
    if stats:
        print(f"\nconstitution judge: {stats['comparisons']} comparisons; said 'A' for "
              f"{stats['order1_says_A']:.2f} of them in order 1 and {stats['order2_says_A']:.2f} "
              f"in order 2 (A/B swapped); the orders disagreed (tie) on {stats['tie_rate']:.2f}")
    d = json.loads((root / "dpo" / "eval.json").read_text())
    print("\n| model | gold reward | exact match | wall s |\n|---|---|---|---|")
    for who in ("before", "after"):
        g = d[who]
        print(f"| {'SFT' if who == 'before' else 'DPO on gold-labelled SFT samples'} | "
              f"{g['gold/reward']:.3f} | {g['gold/exact']:.3f} | "
              f"{'' if who == 'before' else round(d['wall_time_s'])} |")


if __name__ == "__main__":
    main()
