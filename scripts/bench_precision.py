"""Measure fp32 vs bf16 on this CPU: GEMM throughput and one lfm2-tiny training step.

    python scripts/bench_precision.py

Three ways to compute, each as the Trainer would run it:

- ``fp32``: ``trainer.precision=32-true``;
- ``bf16 native``: ``bf16-mixed`` with torch's bf16 kernels (Lightning's autocast;
  ``cpu_bf16=native``);
- ``bf16 upcast``: ``bf16-mixed`` with ptlight's :class:`~ptlight.engine.cpu_bf16.UpcastBf16`
  (operands rounded to bf16, fp32 kernels, output rounded; ``cpu_bf16=upcast``).

Prints GFLOP/s of square matmuls and of ``F.linear`` ``[400, 512] x [512, 2048]`` (fp32
inputs, as a model's activations and weights are), and seconds per SFT step of the default
``lfm2-tiny`` (batch 32, ~50 tokens), each the fastest of a few calls after a warm-up.
``cpu_bf16=auto`` and the default ``trainer.precision`` follow what this prints on the machine
you run it on. On a shared machine, ``OMP_NUM_THREADS=1`` keeps OpenMP threads from
oversubscribing the cores (which slows every mode unevenly).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import MixedPrecision

from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.config import config_dir
from ptlight.engine.cpu_bf16 import UpcastBf16Precision, has_native_bf16_matmul
from ptlight.engine.logps import completion_logps

MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "fp32": contextlib.nullcontext,
    "bf16 native": lambda: MixedPrecision("bf16-mixed", "cpu").forward_context(),
    "bf16 upcast": lambda: UpcastBf16Precision().forward_context(),
}


def fastest(fn: Callable[[], object], budget_s: float = 0.5, max_reps: int = 10) -> float:
    """Seconds of the fastest of at least 2 calls after a warm-up (more while within
    ``budget_s``, up to ``max_reps``): on a shared machine, the least-disturbed run."""
    fn()
    times: list[float] = []
    while len(times) < 2 or (sum(times) < budget_s and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gflops(fn: Callable[[], torch.Tensor], flops: float, mode: str) -> float:
    with MODES[mode]():
        return flops / fastest(fn) / 1e9


def step_seconds(mode: str) -> float:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config")
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_policy(cfg.model, tok)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    ids = torch.randint(3, len(tok), (32, 50))
    attn, mask = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 30:] = True

    def step() -> None:
        with MODES[mode]():
            loss = -completion_logps(model, ids, attn, mask).logps.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return fastest(step, budget_s=2.0, max_reps=5)


def row(name: str, values: dict[str, float], unit: str, higher_is_better: bool) -> None:
    f32 = values["fp32"]
    ratio = (lambda v: v / f32) if higher_is_better else (lambda v: f32 / v)
    cells = " | ".join(f"{m} {v:7.3f} {unit}" if unit == "s" else f"{m} {v:6.1f} {unit}"
                       for m, v in values.items())
    print(f"{name}: {cells} | speed vs fp32: native {ratio(values['bf16 native']):.2f}x, "
          f"upcast {ratio(values['bf16 upcast']):.2f}x")


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: "
          f"{has_native_bf16_matmul()}")
    for n in (256, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        row(f"matmul {n}x{n}", {m: gflops(lambda: a @ b, 2 * n**3, m) for m in MODES},
            "GFLOP/s", True)
    x, w = torch.randn(400, 512), torch.randn(2048, 512)
    row("linear [400,512]x[512,2048]",
        {m: gflops(lambda: F.linear(x, w), 2 * 400 * 512 * 2048, m) for m in MODES},
        "GFLOP/s", True)
    row("lfm2-tiny SFT step (batch 32)", {m: step_seconds(m) for m in MODES}, "s", False)


if __name__ == "__main__":
    main()
