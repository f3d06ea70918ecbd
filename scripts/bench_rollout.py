"""Rollout throughput of the ``hf`` engine: generated tokens/s of lfm2-tiny (random init or
``--model DIR``) on the arith task's prompts, for the ways one could sample G completions.

    python scripts/bench_rollout.py [--model DIR] [--prompts 16] [--g 8] [--new 16]
                                    [--repeats 3] [--cache static]

Rows: one prompt and one sample at a time (a Python loop over rows, as a naive RL loop
does); one prompt at a time with its G samples batched; every prompt × G in one batched
call (what ``method=grpo`` does). Each row reports the median of ``--repeats`` runs after one
warm-up: generated tokens (up to and including EOS), wall s and tokens/s. ``--cache static``
adds a row with ``engine_args.cache_implementation=static`` (or the error transformers gives
for the model). Prints a markdown table with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="an export dir (default: lfm2-tiny at init)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--new", type=int, default=16, help="max new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=None, help="also try this cache_implementation")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from ptlight.config import config_dir
    from ptlight.data.module import left_pad
    from ptlight.engine.rollout import HFGenerate
    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.tasks import arith

    cfg = OmegaConf.load(f"{config_dir()}/model/lfm2-tiny.yaml")
    if args.model:
        cfg.path = args.model
    torch.manual_seed(0)
    tok = load_tokenizer(cfg)
    model = build_policy(cfg, tok).eval()
    rows = arith.make_rows("prompt", args.prompts, 0, "heldout")
    ids = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False).input_ids for r in rows]
    kw = dict(max_new_tokens=args.new, temperature=1.0, top_p=1.0, top_k=0,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def run(engine: HFGenerate, mode: str) -> tuple[int, float]:
        started, tokens = time.perf_counter(), 0
        if mode == "row":
            for one in ids:
                t = torch.tensor([one])
                for _ in range(args.g):
                    tokens += engine.generate(model, t, torch.ones_like(t), n=1, **kw).num_tokens
        elif mode == "prompt":
            for one in ids:
                t = torch.tensor([one])
                tokens += engine.generate(model, t, torch.ones_like(t), n=args.g, **kw).num_tokens
        else:
            batch = left_pad(ids, tok.pad_token_id)
            tokens = engine.generate(model, batch["input_ids"], batch["attention_mask"],
                                     n=args.g, **kw).num_tokens
        return tokens, time.perf_counter() - started

    table = []
    plans = [("one row at a time (prompts × G calls)", HFGenerate(), "row"),
             ("one prompt at a time, its G batched", HFGenerate(), "prompt"),
             ("all prompts × G in one call (method=grpo)", HFGenerate(), "batch")]
    if args.cache:
        plans.append((f"all in one call, cache_implementation={args.cache}",
                      HFGenerate(cache_implementation=args.cache), "batch"))
    for label, engine, mode in plans:
        try:
            run(engine, mode)  # warm-up
            results = [run(engine, mode) for _ in range(args.repeats)]
        except Exception as exc:  # a cache the model's generate does not support
            table.append((label, "–", "–", f"error: {type(exc).__name__}: {str(exc)[:80]}"))
            continue
        tokens = statistics.median(r[0] for r in results)
        wall = statistics.median(r[1] for r in results)
        table.append((label, f"{tokens:.0f}", f"{wall:.2f}", f"{tokens / wall:,.0f}"))

    import transformers

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.processor()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {args.prompts} arith prompts × G={args.g}, up to "
          f"{args.new} new tokens, T=1.0, {'model ' + args.model if args.model else 'lfm2-tiny at init'}\n")
    print("| generation | tokens | wall s | tokens/s |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
