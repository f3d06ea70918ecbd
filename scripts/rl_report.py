"""RL from the verifier at equal wall clock: every critic-free method, PPO and DPO from one SFT
checkpoint on the bundled arith task (``data=arith``: sums whose SFT demonstrations forget the
carry half the time), evaluated on its 200 held-out prompts (greedy).

    python scripts/rl_report.py [--budget 60] [--sft DIR] [--methods grpo dapo ...]
                                [--out DIR] [-- extra overrides for every run]

1. SFT as ``experiment=grpo`` does (1200 steps at lr 1e-3 on the arith demonstrations),
   unless ``--sft`` names an export to start from.
2. Each method from that export for ``--budget`` seconds of training (Lightning's
   ``trainer.max_time``; ``trainer.max_steps`` is set far beyond reach, and every run uses a
   constant learning rate — the RL configs' schedule — so that cap never shapes a
   schedule), then the gold evaluation. Otherwise every method uses its config's defaults; the
   reward is the arith task's verifier (``reward=gold``) for the RL methods, DPO trains on the
   task's preference pairs.

Prints the table (gold reward, exact match, carry exact, optimiser steps, training s,
rollout tokens/s: generated tokens over generation time, mean over rollout batches) and writes
``<out>/rl_report.json`` with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "reinforce_pp", "online_dpo", "ppo", "dpo")


def run(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    started = time.time()
    cmd = [sys.executable, "-m", "ptlight", "data=arith", *overrides,
           f"hydra.run.dir={out / name}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / name / "eval.json").read_text()), time.time() - started


def tokens_per_s(run_dir: Path) -> float | None:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    values = [float(r["train/rollout/tokens_per_s"]) for r in rows
              if r.get("train/rollout/tokens_per_s")]
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/rl_report"))
    parser.add_argument("--budget", type=int, default=60, help="training seconds per method")
    parser.add_argument("--sft", type=Path, default=None, help="an SFT export to start from")
    parser.add_argument("--sft-steps", type=int, default=1200)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.sft is None:
        sft, sft_s = run("sft", args.out, ["method=sft", f"trainer.max_steps={args.sft_steps}",
                                           "method.optim.lr=1.0e-3", *args.extra])
        args.sft = args.out / "sft" / "export"
        rows.append({"method": "start (before SFT)", **_gold(sft["before"])})
        rows.append({"method": "sft (the start of every row below)", **_gold(sft["after"]),
                     "steps": sft.get("global_step"), "train_s": sft.get("fit_time_s")})
    minutes, seconds = divmod(args.budget, 60)
    for method in args.methods:
        report, _ = run(method, args.out, [
            f"method={method}", f"model.path={args.sft}", "eval.before=false",
            "trainer.max_steps=100000", "method.optim.scheduler=constant_with_warmup",
            "method.optim.warmup_ratio=0.0",
            f"+trainer.max_time=00:00:{minutes:02d}:{seconds:02d}", *args.extra])
        rows.append({"method": method, **_gold(report["after"]),
                     "steps": report.get("global_step"), "train_s": report.get("fit_time_s"),
                     "rollout_tokens_per_s": tokens_per_s(args.out / method)})
    import torch
    import transformers

    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
              "transformers": transformers.__version__, "budget_s": args.budget,
              "sft": str(args.sft), "rows": rows}
    (args.out / "rl_report.json").write_text(json.dumps(result, indent=2))
    print("\n| method | gold reward | exact | carry exact | steps | training s | "
          "rollout tokens/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        tps = r.get("rollout_tokens_per_s")
        print(f"| {r['method']} | {r['reward']:.3f} | {r['exact']:.3f} | "
              f"{r['carry_exact']:.3f} | {r.get('steps') or ''} | {r.get('train_s') or ''} | "
              f"{'' if tps is None else f'{tps:.0f}'} |")


def _gold(g: dict) -> dict:
    return {"reward": g["gold/reward"], "exact": g["gold/exact"],
            "carry_exact": g.get("arith/carry_exact", float("nan"))}


if __name__ == "__main__":
    main()
