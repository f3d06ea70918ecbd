"""Both MFUs of the runs in ``bench_gpu.json`` files: what each run computes, and the usual
count of model FLOPs (``data MFU``), from the step times the files hold.

    python scripts/data_mfu.py bench_results/h200-2026-11-27b/run1_bench12_gpu.json ...

``scripts/bench_gpu.py`` writes both columns since 2026-11-27; this reads files written before
that too. MFU (the column ``bench_gpu.py`` always had) counts the FLOPs a run's body computes:
a packed row runs a shared prompt once, and ptlight's LM head runs on the scored tokens only.
Data MFU counts 6·N·T (8·N·T with a live reference), N every parameter, embedding included, and
T the tokens of both sequences of every pair: what an implementation that scores each sequence
whole runs, and the count in which issue 15's baseline reproduces (ptlight's packed step at
84–87 pairs/s on the 350M shape, 16 pairs of ~500-token sequences, ~790 TFLOP/s:
6 · 354M · 16,000 / 0.187 s / 790 TFLOP/s ≈ 23%, the issue's "≈ 22%"; the count of what the
step computes puts it at 8–10%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402  (param counts, data_flops)
import bench_gpu  # noqa: E402  (fixtures, run configs)


def live_reference(name: str, run: dict) -> bool:
    """Whether a run's reference ran live: recorded since 2026-11-27; for an older file, what
    the run's configuration says now (``default`` precomputes, as the GPU defaults have since
    2026-11-27's first command; at 2026-11-26's commits the defaults ran it live, so read
    those files' ``default`` rows as 6/8 of their data MFU)."""
    if "live_reference" in run:
        return bool(run["live_reference"])
    framework, config = name.split(" ", 1)
    if framework == "trl":
        return bench_dpo.trl_live_reference(bench_gpu.TRL_CONFIGS[config])
    # (a configuration since renamed or dropped ran on the defaults: precomputed)
    return "method.reference=copy" in bench_gpu.PTLIGHT_CONFIGS.get(config, [])


def rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    out = []
    for rec in data["records"]:
        peak = rec["matmul_peak_tflops"] * 1e12
        for name, run in rec["runs"].items():
            if "error" in run:
                continue
            tokens = run["tokens_per_s"] * run["step_s"]
            flops = bench_dpo.data_flops(tokens, rec["fixture"], live_reference(name, run))
            out.append({"file": str(path), "device": data["meta"]["device_name"],
                        "fixture": rec["fixture"], "run": name,
                        "pairs_per_s": run["pairs_per_s"], "ms_per_step": run["step_s"] * 1e3,
                        "mfu": run["mfu"], "data_mfu": flops / run["step_s"] / peak})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    print("| file | fixture | run | pairs/s | ms/step | MFU | data MFU |")
    print("|---|---|---|---|---|---|---|")
    for path in args.files:
        for r in rows(path):
            print(f"| {path.parent.name}/{path.name} | {r['fixture']} | {r['run']} | "
                  f"{r['pairs_per_s']:.1f} | {r['ms_per_step']:.1f} | {100 * r['mfu']:.0f}% | "
                  f"{100 * r['data_mfu']:.1f}% |")


if __name__ == "__main__":
    main()
