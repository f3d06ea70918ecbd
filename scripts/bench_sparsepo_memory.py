"""Peak memory of one SparsePO / TDPO training step vs one plain DPO step, same shape.

    python scripts/bench_sparsepo_memory.py --shape lfm2-350m --out bench_out   # the claim
    python scripts/bench_sparsepo_memory.py --shape tiny --steps 1              # smoke (~20 s)

The claim checked: the per-token full-vocabulary terms (KL to the reference at every
completion position) cost no ``[tokens × vocab]`` block, so a sparsepo/tdpo step's peak stays
within 10% of plain DPO's at the LFM2-350M shape (hidden 1024, 16 layers, FFN 4608, vocab
65536, tied; random init, the ``lfm2-350m`` fixture of ``scripts/bench_dpo.py``).

Each configuration runs in its own subprocess (``--child``) so its peak is its own: the policy
is built from config, wrapped in :class:`ptlight.methods.preference.PreferenceMethod` exactly as
training does, and ``--steps`` steps run (``forward_batch`` -> backward -> AdamW step ->
gradients freed). Peak = ``torch.cuda.max_memory_allocated`` on a GPU, else ``ru_maxrss``
(the whole process: Python, torch and the weights included), with glibc's mmap threshold at
``--mmap-threshold`` (128 KB: freed tensors go back to the OS, so the peak is what was live;
with glibc's default, blocks it keeps make identical runs differ by up to ~6%);
``before_steps_mb`` in the json
is the same measure once the models are built, before the first step. Rows of ``--pairs`` pairs: a
``--prompt`` -token prompt and chosen/rejected completions of ``--completion`` tokens
(random ids; the memory does not depend on the values).

Configurations: ``dpo`` with ``method.reference=copy`` (the like-for-like baseline: sparsepo
and tdpo need a live reference, so they also hold a frozen copy) and with ``precompute`` (no
copy at all: the opt-in ``method.reference=precompute``); ``tdpo`` (TDPO2), ``sparsepo`` with
learnable and with activation masks, all with ``copy``. The table gives each peak and its
ratio to ``dpo`` (copy) and to ``dpo`` (precompute). Writes ``<out>/sparsepo_memory.json``
with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_dpo import FIXTURES  # noqa: E402  (the 350m shape is defined once, there)

RESULT = "MEM_RESULT "
SHAPES = {
    "lfm2-350m": dict(arch=FIXTURES["lfm2-350m"]["arch"], pairs=2, prompt=440, completion=64),
    "tiny": dict(arch=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2,
                           layer_types=["conv", "conv", "full_attention"], vocab_size=4096),
                 pairs=2, prompt=24, completion=8),
}
CONFIGS = {  # name -> (objective, hyperparameters, reference)
    "dpo (copy)": ("dpo", {}, "copy"),
    "dpo (precompute)": ("dpo", {}, "precompute"),
    "tdpo (copy)": ("tdpo", {}, "copy"),
    "sparsepo learnable (copy)": ("sparsepo", {"mask": "learnable"}, "copy"),
    "sparsepo activation (copy)": ("sparsepo", {"mask": "activation"}, "copy"),
}


def _objective(name: str, hparams: dict):
    from ptlight.objectives.dpo import DPO
    from ptlight.objectives.sparsepo import SparsePO
    from ptlight.objectives.tdpo import TDPO

    return {"dpo": DPO, "tdpo": TDPO, "sparsepo": SparsePO}[name](**hparams)


def child(args) -> dict:
    import torch
    from omegaconf import OmegaConf
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from ptlight.methods.preference import PreferenceMethod
    from ptlight.model.reference import FrozenCopy, PolicyAtStart, Precomputed

    shape = SHAPES[args.shape]
    name, hparams, ref_mode = CONFIGS[args.config]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = Lfm2Config(**shape["arch"], tie_word_embeddings=True, use_cache=False)
    policy = Lfm2ForCausalLM(cfg).to(device).train()
    if ref_mode == "copy":
        reference = FrozenCopy(policy)
    else:  # the values a precompute would have stored; the scorer (the policy) is let go
        reference = Precomputed(PolicyAtStart(policy))
        reference.values = {"train": torch.zeros(shape["pairs"], 2, device=device)}
        reference.release()
    method = PreferenceMethod(policy, _objective(name, hparams), OmegaConf.create({}),
                              reference=reference, pack=args.pack).to(device)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n, p, c = shape["pairs"], shape["prompt"], shape["completion"]
    prompt = torch.randint(5, cfg.vocab_size, (n, p), generator=g)
    completions = torch.randint(5, cfg.vocab_size, (2 * n, c), generator=g)
    ids = torch.cat([prompt.repeat(2, 1), completions], dim=1)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, p:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
             "index": torch.arange(n)}
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-mixed")
    times = []
    before_mb = (torch.cuda.memory_allocated() / 2**20 if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        t = time.perf_counter()
        with autocast:
            out, _ = method.forward_batch(batch, "train")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": args.config, "peak_mb": round(peak_mb, 1), "device": device.type,
            "before_steps_mb": round(before_mb, 1),
            "step_s": round(min(times), 3), "loss": round(float(out.loss), 6),
            "completion_tokens": int(loss_mask[:, 1:].sum())}


def _versions() -> dict:
    import lightning
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": platform.platform(), "processor": platform.processor(), "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="lfm2-350m")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="glibc MALLOC_MMAP_THRESHOLD_ of the CPU runs (0: glibc's default)")
    ap.add_argument("--pack", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.pack = {"true": True, "false": False}.get(args.pack, args.pack)
    if args.child:
        print(RESULT + json.dumps(child(args)), flush=True)
        return 0
    rows = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", "--config", config, "--shape", args.shape,
               "--steps", str(args.steps), "--pack", str(args.pack).lower(),
               "--precision", args.precision]
        env = dict(os.environ)
        if args.mmap_threshold:  # glibc hands freed blocks back: RSS tracks what is live
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith(RESULT)), None)
        if line is None:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"{config}: the child run failed")
        rows.append(json.loads(line[len(RESULT):]))
        print(f"[bench] {config}: {rows[-1]['peak_mb']} MB", file=sys.stderr)
    base = {r["config"]: r["peak_mb"] for r in rows}
    print(f"| config | peak MB ({rows[0]['device']}) | vs dpo (copy) | vs dpo (precompute) "
          "| step s |\n|---|---|---|---|---|")
    for r in rows:
        ratio = lambda k: f"{r['peak_mb'] / base[k]:.3f}" if k in base else "–"  # noqa: E731
        print(f"| {r['config']} | {r['peak_mb']} | {ratio('dpo (copy)')} | "
              f"{ratio('dpo (precompute)')} | {r['step_s']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "shape": args.shape, **SHAPES[args.shape], "steps": args.steps,
              "pack": args.pack, "precision": args.precision, "versions": _versions(),
              "runs": rows}
    (args.out / "sparsepo_memory.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
