"""RLHF on the bundled task against DPO, from the same SFT start with the same wall-clock budget.

    python scripts/rlhf_report.py [--sft DIR] [--rm RUN_DIR] [--dpo-steps 100] [--kl-coefs 0.2,0.5]
                                  [--out DIR] [-- overrides]

1. SFT start: ``--sft <export>`` (its run's ``eval.json`` supplies the start's gold metric when it
   has one), or a fresh ``method=sft`` run (the default pipeline's first stage, 250 steps).
2. Reward model: ``--rm <run dir>`` reuses one, else ``method=rm model.path=<sft>`` (its own
   steps: RM training is a cost RLHF pays before PPO and DPO does not; its wall time and
   held-out pairwise accuracy are reported).
3. DPO as the default pipeline runs it (``--dpo-steps`` 100, its cosine schedule); its
   ``trainer.fit`` time is the budget. PPO with the learned reward model, and PPO with the task's
   gold reward (what PPO does with a perfect reward), each from the SFT export with
   ``+trainer.max_time`` = that budget, so both train for as long as DPO did; then the gold
   metric on the same ``eval.num_prompts`` held-out prompts (greedy).
4. ``--kl-coefs 0.2,0.5``: PPO + learned RM again with each KL coefficient, for as many
   optimiser steps as step 3's PPO + learned RM run took (a reward-hacking check).

Prints and writes ``<out>/rlhf.md`` and ``<out>/rlhf.json``. Overrides after ``--`` reach every
run (e.g. ``-- eval.num_prompts=200``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


# as in conf/experiment/rlhf.yaml: 2 PPO epochs per rollout batch (the method config's default is 4)
PPO = ["method.ppo.num_ppo_epochs=2"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, help="SFT export dir (default: train one first)")
    parser.add_argument("--dpo-steps", type=int, default=100,
                        help="DPO steps (the default pipeline's); its fit time is PPO's budget")
    parser.add_argument("--rm-steps", type=int, default=100)
    parser.add_argument("--rm", type=Path, help="a finished `method=rm` run dir to reuse "
                        "(default: train one from the SFT export)")
    parser.add_argument("--kl-coefs", default="",
                        help="comma list of extra method.ppo.kl_coef values for PPO + learned RM, "
                             "each run for as many optimiser steps as the budgeted PPO + RM run")
    parser.add_argument("--out", type=Path, help="output dir (default: outputs/rlhf-<time>)")
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    if args.sft and not (args.sft / "config.json").is_file():
        parser.error(f"--sft {args.sft}: not a model directory (no config.json)")
    args.out = (args.out or Path("outputs") / f"rlhf-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    return args


def run(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """``python -m ptlight <overrides> hydra.run.dir=<run_dir>``; returns its eval.json."""
    cmd = [sys.executable, "-m", "ptlight", *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((run_dir / "eval.json").read_text())
    report["process_s"] = round(time.time() - started, 1)
    return report


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ov = args.overrides

    rows: list[dict[str, Any]] = []

    if args.sft is None:
        sft = run(args.out / "sft", "method=sft", "trainer.max_steps=250", *ov)
        sft_export, start = Path(sft["export_dir"]), sft.get("after")
        sft_wall = sft["wall_time_s"]
    else:
        sft_export, sft_wall = args.sft.resolve(), None
        prior = sft_export.parent / "eval.json"
        start = json.loads(prior.read_text()).get("after") if prior.is_file() else None
    if args.rm is not None:
        rm = json.loads((args.rm / "eval.json").read_text())
    else:
        rm = run(args.out / "rm", "method=rm", f"model.path={sft_export}",
                 f"trainer.max_steps={args.rm_steps}", *ov)
    rm_export = rm["export_dir"]
    common = [f"model.path={sft_export}", "eval.before=false", "+trainer.limit_val_batches=0",
              "eval.val_samples=0"]
    dpo = run(args.out / "dpo", "method=dpo", f"trainer.max_steps={args.dpo_steps}", *common, *ov)
    budget = math.ceil(dpo["fit_time_s"])  # PPO trains for as long as DPO's fit took
    m, sec = divmod(budget, 60)
    h, m = divmod(m, 60)
    ppo_common = [*common, *PPO, "trainer.max_steps=1000000",  # max_time stops it
                  f"+trainer.max_time='00:{h:02d}:{m:02d}:{sec:02d}'"]  # DD:HH:MM:SS
    ppo_rm = run(args.out / "ppo-rm", "method=ppo", *ppo_common, "reward=reward_model",
                 f"reward.path={rm_export}", *ov)
    ppo_gold = run(args.out / "ppo-gold", "method=ppo", *ppo_common, *ov)
    extra = {}
    for beta in filter(None, args.kl_coefs.split(",")):
        extra[beta] = run(args.out / f"ppo-rm-kl{beta}", "method=ppo", *common, *PPO,
                          f"trainer.max_steps={ppo_rm['global_step']}", "reward=reward_model",
                          f"reward.path={rm_export}", f"method.ppo.kl_coef={beta}", *ov)

    if start is not None:
        rows.append({"model": "sft (start)", "gold reward": start["gold/reward"],
                     "exact match": start["gold/exact"], "train s": sft_wall, "steps": 250})
    rows.append({"model": "reward model (for PPO)", "gold reward": None, "exact match": None,
                 "train s": rm.get("fit_time_s", rm["wall_time_s"]), "steps": rm["global_step"],
                 "note": f"held-out pairwise accuracy {rm['heldout']['rm/accuracy']:.3f} "
                         f"on {rm['heldout']['num_pairs']} pairs"})
    for name, rep in (("dpo", dpo), ("ppo + learned RM", ppo_rm), ("ppo + gold reward", ppo_gold)):
        rows.append({"model": name, "gold reward": rep["after"]["gold/reward"],
                     "exact match": rep["after"]["gold/exact"], "train s": rep["fit_time_s"],
                     "steps": rep["global_step"], "process s": rep["process_s"]})
    for beta, rep in extra.items():
        rows.append({"model": f"ppo + learned RM, kl_coef {beta}",
                     "gold reward": rep["after"]["gold/reward"],
                     "exact match": rep["after"]["gold/exact"], "train s": rep["fit_time_s"],
                     "steps": rep["global_step"], "note": "same steps as ppo + learned RM"})
    lines = ["| model | gold reward | exact match | training wall s | optimiser steps | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['model']} | {fmt(r['gold reward'])} | {fmt(r['exact match'])} | "
                     f"{fmt(r['train s'])} | {r['steps']} | {r.get('note', '')} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "rlhf.md").write_text(table + "\n")
    (args.out / "rlhf.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
