"""The worked example end to end: SFT then DPO on the reversal task of plugins/ptlight-reverse,
from its data files and the CLI alone, evaluated on its task file (200 held-out prompts).

    pip install --no-deps -e plugins/ptlight-reverse
    python scripts/reverse_report.py [--out DIR] [-- extra overrides for both stages]

Prints the gold table (start, after SFT, after DPO with ``rpo_alpha=1`` — DPO plus the NLL
of the chosen answer, RPO — and after plain DPO: mean reward, exact match, wall s) and writes
it to ``<out>/reverse_report.json``. The step counts are the default pipeline's; both DPO runs
start from the same SFT export.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "plugins" / "ptlight-reverse" / "data"


def stage(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    started = time.time()
    cmd = [sys.executable, "-m", "ptlight", *overrides, f"hydra.run.dir={out / name}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / name / "eval.json").read_text()), time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/reverse_report"))
    parser.add_argument("extra", nargs="*", help="overrides for both stages")
    args = parser.parse_args()
    task = f"data.task={DATA / 'task.yaml'}"
    sft, sft_s = stage("sft", args.out, ["method=sft", f"data.path={DATA / 'sft.jsonl'}", task,
                                         "trainer.max_steps=250", *args.extra])
    pairs = [f"model.path={args.out / 'sft' / 'export'}", f"data.path={DATA / 'pairs.jsonl'}",
             task, "trainer.max_steps=100", "eval.before=false"]
    rpo, rpo_s = stage("dpo_rpo", args.out, ["method=dpo", *pairs,
                                             "method.objective.rpo_alpha=1.0", *args.extra])
    dpo, dpo_s = stage("dpo", args.out, ["method=dpo", *pairs, *args.extra])
    rows = [("start (before SFT)", sft["before"], None), ("after SFT", sft["after"], sft_s),
            ("after DPO, rpo_alpha=1 (RPO)", rpo["after"], rpo_s),
            ("after plain DPO", dpo["after"], dpo_s)]
    import torch
    import transformers

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "rows": [{"model": n, "gold/reward": g["gold/reward"], "gold/exact": g["gold/exact"],
                  "wall_s": None if s is None else round(s)} for n, g, s in rows],
    }
    (args.out / "reverse_report.json").write_text(json.dumps(result, indent=2))
    print("\n| model | gold reward | exact match | wall s (whole command) |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['gold/reward']:.3f} | {r['gold/exact']:.3f} | "
              f"{'' if r['wall_s'] is None else r['wall_s']} |")


if __name__ == "__main__":
    main()
