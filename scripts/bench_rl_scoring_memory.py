"""Peak memory of the RL methods' scoring (PPO, GRPO and its family) with its entropy metric
detached, against the same scoring with the entropy recorded in the autograd graph.

    python scripts/bench_rl_scoring_memory.py                      # vocab 65536, 8 × 128 tokens
    python scripts/bench_rl_scoring_memory.py --vocab 4096 --rows 2 --tokens 16   # smoke

``ptlight.methods.ppo.token_scores`` returns the completion tokens' log-probs (with their
graph: the loss is built on them) and their entropies, a logged metric. ``detached`` is
ptlight's: the entropy is computed from the detached log-softmax, so the backward keeps the
log-softmax's ``[rows, tokens, vocab]`` fp32 output only, and the logits are freed once the
log-softmax is taken. ``recorded`` is the scoring as it was: the logits live until it
returns, and the same entropy is computed with autograd recording, whose graph keeps ``exp``
of the log-softmax (and the log-softmax itself) alive until the entropy tensor dies, which in
the methods' minibatch loops is when the next minibatch's scoring returns, after its
backward.

Each variant runs in its own subprocess, on a 2-layer LFM2 at width 64 (the vocabulary-sized
tensors dominate), scoring ``--rows`` sequences of ``--prompt`` + ``--tokens`` tokens and
running the backward of the log-probs' sum, three times in a loop as the methods' minibatch
loops do (each call's outputs live until the next call returns); the figure is the growth of
the process's peak RSS (``ru_maxrss``) over those calls, on the CPU. Prints a markdown table
with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def child(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptlight.methods import ppo

    if args.variant == "recorded":
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
        scores = ppo.token_scores
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "lfm2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
        vocab_size=args.vocab))
    ids = torch.randint(5, args.vocab, (args.rows, args.prompt + args.tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):  # minibatches, as the methods loop over them: each iteration's
        # outputs live until the next call returns (the entropy through the next minibatch's
        # forward and backward, the log-probs, their graph spent, as well)
        logps, entropy, _ = scores(model, ids, torch.ones_like(ids), args.prompt + 1, 1.0)
        logps.sum().backward()
    return {"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--variant", choices=["detached", "recorded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    import torch
    import transformers

    block = args.rows * args.tokens * args.vocab * 4 / 1e6
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"vocab {args.vocab}, {args.rows} × {args.tokens} completion tokens "
          f"([rows, tokens, vocab] fp32: {block:.0f} MB)")
    print("| entropy | peak RSS growth MB |\n|---|---|")
    for variant in ("detached", "recorded"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab",
                              str(args.vocab), "--rows", str(args.rows), "--prompt",
                              str(args.prompt), "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
        print(f"| {variant} | {growth:.0f} |", flush=True)


if __name__ == "__main__":
    main()
