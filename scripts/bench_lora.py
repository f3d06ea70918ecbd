"""Trainable parameters, peak RSS and step time of DPO with and without LoRA.

    python scripts/bench_lora.py                          # LFM2-350M shape, 3 steps per config
    python scripts/bench_lora.py --shape tiny --steps 2   # lfm2-tiny: a seconds-long smoke run
    python scripts/bench_lora.py --threads 1              # on a CPU shared with other jobs

``--threads`` sets torch's intra-op threads (default: torch's own choice). On a busy machine,
fewer threads than cores avoids spin-waiting workers: on the 2-core CI box shared with two
other jobs, lfm2-tiny ran 0.7 s/step with 1 thread and 14 s/step with 2.

The ``350m`` shape is LiquidAI/LFM2-350M's config with random weights (nothing is downloaded):
hidden 1024, 16 layers with attention at [2, 5, 8, 10, 12, 14] and short convolutions
elsewhere, ``intermediate_size`` 6656 auto-adjusted as in the real config (2/3 · 6656 rounded
up to a multiple of 256 = 4608), 16 heads / 8 KV heads, vocab 65536, tied embeddings: 354 M
parameters. Each config runs in its own subprocess, which builds the policy and the reference
exactly as ``train_stage`` does (full: a frozen copy; LoRA: the policy with adapters off) and
runs ``PreferenceMethod`` with the ``dpo`` objective under a Lightning ``Trainer`` (fp32,
AdamW) on synthetic batches of 2 pairs x 256 tokens (128 prompt + 128 completion). The child
reports ``ru_maxrss`` (peak resident memory of the whole process, imports included) before
building the model and at the end; step time is the mean over steps after the first.
It deliberately does not export or evaluate (an export would add its own memory peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "350m": [
        "model.arch.hidden_size=1024", "model.arch.intermediate_size=6656",
        "model.arch.block_auto_adjust_ff_dim=true", "model.arch.num_hidden_layers=16",
        "model.arch.num_attention_heads=16", "model.arch.num_key_value_heads=8",
        "+model.arch.vocab_size=65536",
        "model.arch.layer_types=[conv,conv,full_attention,conv,conv,full_attention,conv,conv,"
        "full_attention,conv,full_attention,conv,full_attention,conv,full_attention,conv]",
    ],
    "tiny": [],
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _batches(vocab: int, pairs: int, length: int, steps: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        ids = torch.randint(3, vocab, (2 * pairs, length), generator=gen)
        loss_mask = torch.zeros_like(ids, dtype=torch.bool)
        loss_mask[:, length // 2:] = True  # the completion half
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "loss_mask": loss_mask, "index": torch.arange(pairs) + step * pairs})
    return out


def child(lora: bool, shape: str, steps: int, pairs: int, length: int, threads: int) -> dict:
    """One config in this process; returns the figures."""
    import lightning as L
    import torch

    if threads:
        torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from torch.utils.data import DataLoader

    from ptlight.model.backbone import (build_policy, has_adapters, load_tokenizer,
                                        parameter_counts)
    from ptlight.model.reference import AdapterReference, FrozenCopy
    from ptlight.config import config_dir
    from ptlight.methods.preference import PreferenceMethod
    from ptlight.objectives import build_objective

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "method=dpo", f"model.lora.enabled={str(lora).lower()}", *SHAPES[shape]])
    rss_imports = _rss_mib()
    torch.manual_seed(0)
    tok = load_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok)
    mode = "adapter" if has_adapters(policy) else "copy"
    reference = AdapterReference(policy) if has_adapters(policy) else FrozenCopy(policy)
    trainable, total = parameter_counts(policy)
    held = total + (parameter_counts(reference.model)[1] if mode == "copy" else 0)
    module = PreferenceMethod(policy, build_objective("dpo", {"beta": 0.1}), cfg.method.optim,
                              reference=reference)
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            times.append(time.perf_counter())

        def on_train_batch_end(self, *args) -> None:
            times[-1] = time.perf_counter() - times[-1]

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Clock()])
    vocab = policy.get_input_embeddings().weight.shape[0]
    batches = DataLoader(_batches(vocab, pairs, length, steps), batch_size=None)  # as given
    trainer.fit(module, train_dataloaders=batches)
    later = times[1:] or times
    return {"config": f"DPO {'LoRA r=' + str(cfg.model.lora.r) if lora else 'full'}",
            "reference": mode, "trainable": trainable, "total": total, "held": held,
            "rss_imports_mib": rss_imports,
            "peak_rss_mib": _rss_mib(), "s_per_step": sum(later) / len(later),
            "steps": trainer.global_step, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="350m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "lora", args.shape, args.steps, args.pairs,
                               args.length, args.threads)))
        return
    rows = []
    for which in ("full", "lora"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", which, "--shape", args.shape, "--steps",
             str(args.steps), "--pairs", str(args.pairs), "--length", str(args.length),
             "--threads", str(args.threads)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"DPO, {args.shape} shape, {args.pairs} pairs x {args.length} tokens, fp32, "
          f"{args.steps} steps per config, {rows[0]['threads']} torch thread(s) "
          "(step time: mean after the first)\n")
    print("| config | reference | trainable params | policy params | trainable % "
          "| params held (policy + reference) | peak RSS (MiB) | RSS after imports (MiB) "
          "| s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['reference']} | {r['trainable']:,} | {r['total']:,} "
              f"| {100 * r['trainable'] / r['total']:.2f} | {r['held']:,} "
              f"| {r['peak_rss_mib']:,.0f} "
              f"| {r['rss_imports_mib']:,.0f} | {r['s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
