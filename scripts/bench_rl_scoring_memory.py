"""Peak memory and time of the RL methods' scoring (PPO, GRPO and its family): the LM head in
checkpointed row chunks, against one ``[rows, tokens, vocab]`` block, and against that block
with its entropy metric recorded in the autograd graph.

    python scripts/bench_rl_scoring_memory.py                      # vocab 65536, 8 × 128 tokens
    python scripts/bench_rl_scoring_memory.py --vocab 4096 --rows 2 --tokens 16   # smoke

``ptlight.methods.ppo.token_scores`` returns the completion tokens' log-probs (with their
graph: the loss is built on them) and their entropies, a logged metric.

- ``chunked`` is ptlight's (:func:`ptlight.engine.logps.target_logps`): the head and the
  log-softmax run on row chunks (the hidden size's rows, or 64 MB of fp32 log-probs if more),
  so the logits and the log-softmax's gradient are one chunk's at a time; the backward keeps
  each chunk's fp32 log-softmax (one ``[rows, tokens, vocab]`` block in all), and past 1 GiB
  of it the chunks are checkpointed instead (nothing vocabulary-sized lives from the forward
  to the backward, which recomputes one chunk at a time: a second head matmul).
- ``checkpointed`` is ``chunked`` with the chunks checkpointed whatever the size.
- ``one_block`` is the scoring before that: one fp32 log-softmax of every token kept for the
  backward, the entropy computed from it without a graph, the logits freed once it is taken.
- ``recorded`` is the scoring before that: the logits live until it returns, and the entropy
  is computed with autograd recording, whose graph keeps ``exp`` of the log-softmax (and the
  log-softmax itself) alive until the entropy tensor dies, which in the methods' minibatch
  loops is when the next minibatch's scoring returns, after its backward.

Each variant runs in its own subprocess, on an LFM2 of ``--layers`` layers (conv and attention
alternating) at width ``--hidden`` (default 2 at 64: the vocabulary-sized tensors dominate;
the time column is the head's extra matmul at its worst there), scoring ``--rows`` sequences
of ``--prompt`` + ``--tokens`` tokens and running the backward of the log-probs' sum, three times in a loop as the methods' minibatch
loops do (each call's outputs live until the next call returns); the figures are the growth of
the process's peak RSS (``ru_maxrss``) over those calls, on the CPU, and the mean time of the
last two calls (scoring + backward). Prints a markdown table with the date, machine and
versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


VARIANTS = ("chunked", "checkpointed", "one_block", "recorded")


def child(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptlight.methods import ppo

    if args.variant == "one_block":
        def one_block(model, input_ids, attention_mask, n_prompt, temperature):
            """``token_scores`` before the chunks, statement for statement."""
            h = ppo.backbone_hidden(model, input_ids, attention_mask,
                                    ppo.position_ids(attention_mask))
            h = h[:, n_prompt - 1 : -1]
            targets = input_ids[:, n_prompt:]
            head = model.get_output_embeddings()
            logp_all = torch.log_softmax(
                torch.nn.functional.linear(h, head.weight, head.bias).float() / temperature, dim=-1)
            logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
            with torch.no_grad():
                lp = logp_all.detach()
                entropy = -(lp.exp() * lp).sum(-1)
            return logps, entropy, None

        scores = one_block
    elif args.variant == "recorded":
        def recorded(model, input_ids, attention_mask, n_prompt, temperature):
            """``token_scores`` as it was, statement for statement (what is alive when
            matters here)."""
            h = ppo.backbone_hidden(model, input_ids, attention_mask,
                                    ppo.position_ids(attention_mask))
            h = h[:, n_prompt - 1 : -1]
            targets = input_ids[:, n_prompt:]
            head = model.get_output_embeddings()
            logits = torch.nn.functional.linear(h, head.weight, head.bias).float() / temperature
            logp_all = torch.log_softmax(logits, dim=-1)
            logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logps, entropy, None

        scores = recorded
    else:
        if args.variant == "checkpointed":
            from ptlight.engine import logps

            logps.HEAD_CHECKPOINT_BYTES = 0
        scores = ppo.token_scores
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "lfm2", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        layer_types=["conv", "full_attention"] * (args.layers // 2) + ["conv"] * (args.layers % 2),
        vocab_size=args.vocab))
    ids = torch.randint(5, args.vocab, (args.rows, args.prompt + args.tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(3):  # minibatches, as the methods loop over them: each iteration's
        # outputs live until the next call returns (the entropy through the next minibatch's
        # forward and backward, the log-probs, their graph spent, as well)
        start = time.perf_counter()
        logps, entropy, _ = scores(model, ids, torch.ones_like(ids), args.prompt + 1, 1.0)
        logps.sum().backward()
        seconds.append(time.perf_counter() - start)
    return {"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e3,
            "seconds": sum(seconds[1:]) / 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (conv, attention, ...)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    import torch
    import transformers

    block = args.rows * args.tokens * args.vocab * 4 / 1e6
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"width {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.rows} × {args.tokens} completion tokens "
          f"([rows, tokens, vocab] fp32: {block:.0f} MB)")
    print("| scoring | peak RSS growth MB | s per scoring + backward |\n|---|---|---|")
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab",
                              str(args.vocab), "--rows", str(args.rows), "--prompt",
                              str(args.prompt), "--tokens", str(args.tokens), "--hidden",
                              str(args.hidden), "--layers", str(args.layers)],
                             capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {got['peak_growth_mb']:.0f} | {got['seconds']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
