"""Gold evaluation: greedy generations on held-out prompts, scored by the task's reward.

Prompts are grouped by token length before batching, so most batches need no padding at all;
the rest are left-padded, which LFM2 handles exactly (its short convolutions zero padded
positions, and attention masks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.tasks import get_task


@dataclass
class Sample:
    prompt: str
    completion: str
    reward: float


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer, prompts: list[list[dict[str, str]]], *,
    max_new_tokens: int, batch_size: int,
) -> list[str]:
    """Greedy completions (text, special tokens removed) for conversational prompts."""
    was_training = model.training
    model.eval()
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[row, width - len(encoded[i]):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def gold_eval(model: PreTrainedModel, tokenizer, task_name: str, cfg: DictConfig) -> dict[str, Any]:
    """Mean gold reward and exact-match rate on ``eval.num_prompts`` held-out prompts."""
    task = get_task(task_name)
    rows = task.make_rows("prompt", cfg.num_prompts, cfg.seed, "heldout")
    prompts = [r["prompt"] for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size)
    samples = [Sample(p[-1]["content"], c, task.gold_reward(p[-1]["content"], c))
               for p, c in zip(prompts, completions)]
    rewards = [s.reward for s in samples]
    return {
        "gold/reward": sum(rewards) / len(rewards),
        "gold/exact": sum(r == 1.0 for r in rewards) / len(rewards),
        "num_prompts": len(rewards),
        "samples": [s.__dict__ for s in samples[: cfg.num_samples]],
    }
