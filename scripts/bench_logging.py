"""Host time of training-metric logging in a DPO step, as shipped and logging every value every
step (what ptlight does with ``ptlight.runtime.progress.logs_this_step`` always true).

    python scripts/bench_logging.py                  # tiny LFM2, 60 timed steps each way
    python scripts/bench_logging.py --steps 100 -- trainer.log_every_n_steps=50

Each way runs in its own process (``--one gated|every``), ``--repeats`` times, alternating:
the tiny DPO stage on the CPU with the test fixture's sizes, ``log_every_n_steps=10`` unless
overridden, 3 warm-up steps, then the mean wall time per step and the time spent in
``log_metrics`` per step; printed: the median over the repeats of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=3", "model.arch.layer_types=[conv,conv,full_attention]",
    "data.batch_size=8", "data.val_size=8", "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=100000", "checkpoint.every_n_train_steps=100000",
    "eval.before=false", "eval.val_samples=0", "eval.num_prompts=8", "eval.max_new_tokens=8",
]
WARMUP = 3


def one(way: str, steps: int, extra: list[str]) -> dict:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PTLIGHT_CACHE", tempfile.mkdtemp(prefix="ptlight-bench-cache-"))
    import lightning as L
    from hydra import compose, initialize_config_dir

    import ptlight.methods.common as common
    import ptlight.runtime.progress as progress
    from ptlight.config import config_dir, register_resolvers
    from ptlight.train import train_stage

    if way == "every":
        progress.logs_this_step = lambda module: True
    spent = {"log": 0.0}
    real = common.log_metrics

    def timed(*a, **k):
        t = time.perf_counter()
        real(*a, **k)
        spent["log"] += time.perf_counter() - t

    common.log_metrics = timed

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == WARMUP:
                self.t0, spent["log"] = time.perf_counter(), 0.0

        def on_train_end(self, trainer, *a):
            self.wall = time.perf_counter() - self.t0

    clock = Clock()
    init = L.Trainer.__init__

    def with_clock(self, *a, **k):
        k["callbacks"] = [*(k.get("callbacks") or []), clock]
        init(self, *a, **k)

    L.Trainer.__init__ = with_clock
    register_resolvers()
    overrides = ["method=dpo", *TINY, f"data.num_train={8 * (steps + WARMUP)}",
                 f"trainer.max_steps={steps + WARMUP}", "trainer.log_every_n_steps=10", *extra]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    train_stage(cfg, Path(tempfile.mkdtemp(prefix="ptlight-bench-logging-")))
    return {"way": way, "step_ms": 1000 * clock.wall / steps,
            "log_ms": 1000 * spent["log"] / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=["gated", "every"], help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="more config overrides (after --)")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.steps, args.overrides)))
        return
    import torch

    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results: dict[str, list[dict]] = {"every": [], "gated": []}
    for _ in range(args.repeats):
        for way in results:
            out = subprocess.run([sys.executable, __file__, "--one", way, "--steps",
                                  str(args.steps), "--", *args.overrides],
                                 capture_output=True, text=True, cwd=REPO)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{way}: failed\n{out.stderr[-3000:]}")
            results[way].append(json.loads(line[len("RESULT "):]))
    for way, runs in results.items():
        step = statistics.median(r["step_ms"] for r in runs)
        log = statistics.median(r["log_ms"] for r in runs)
        label = "every value every step" if way == "every" else "as shipped"
        each = ", ".join(f"{r['step_ms']:.1f}" for r in runs)
        print(f"{label:>24}: {step:6.2f} ms a step, {log:5.2f} ms of it logging "
              f"(medians of {len(runs)} runs; their steps: {each} ms)")


if __name__ == "__main__":
    main()
