"""Measure fp32 vs bf16 on this CPU: raw matmul throughput and one lfm2-tiny training step.

    python scripts/bench_precision.py

Prints GFLOP/s per dtype for square matmuls and seconds per SFT step of the default
``lfm2-tiny`` (batch 32, ~50 tokens) under ``32-true`` and ``bf16-mixed`` autocast. ptlight's
default ``trainer.precision`` follows what this prints on the machine you run it on.
"""

from __future__ import annotations

import time

import torch
from hydra import compose, initialize_config_dir

from ptlight.backbone import build_policy, load_tokenizer
from ptlight.config import config_dir
from ptlight.logps import completion_logps


def matmul_gflops(n: int, dtype: torch.dtype, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def step_seconds(bf16: bool, reps: int = 3) -> float:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config")
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_policy(cfg.model, tok)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    ids = torch.randint(3, len(tok), (32, 50))
    attn, mask = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 30:] = True
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = -completion_logps(model, ids, attn, mask).logps.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for n in (256, 1024):
        f32, bf = matmul_gflops(n, torch.float32), matmul_gflops(n, torch.bfloat16)
        print(f"matmul {n}x{n}: fp32 {f32:7.1f} GFLOP/s | bf16 {bf:7.1f} GFLOP/s | "
              f"bf16/fp32 {bf / f32:.2f}x")
    f32, bf = step_seconds(False), step_seconds(True)
    print(f"lfm2-tiny SFT step (batch 32): 32-true {f32:.3f} s | bf16-mixed {bf:.3f} s | "
          f"bf16/fp32 speed {f32 / bf:.2f}x")


if __name__ == "__main__":
    main()
