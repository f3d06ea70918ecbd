"""Evaluation building blocks: generation, the gold metric, win rate, preference accuracy, and
the sample log of a run.

- :func:`generate`: batched completions of prompts (message lists through the chat template,
  strings as plain text, as training renders them), greedy by default
  (``eval.do_sample=true`` samples at ``eval.temperature``, no top-k/top-p, seeded by
  ``eval.seed`` without touching the global RNG). Prompts are grouped by token length before
  batching, so most batches need no padding at all; the rest are left-padded, which LFM2
  handles exactly (its short convolutions zero padded positions, and attention masks them).
- :func:`gold_eval`: mean gold reward, exact-match rate and acceptance
  (:func:`gold_acceptance`) on ``eval.num_prompts`` held-out prompts of a task
  (:class:`ptlight.tasks.Task`: registered or made of files; :func:`gold_samples` keeps every
  scored generation). Exact match is a gold reward at or above the task's ``threshold``.
- :func:`win_rate`: model vs baseline on the same prompts under the gold judge; a win is a
  strictly higher gold reward, ties are counted separately.
- :func:`preference_accuracy`: on pairwise batches (chosen block, then rejected block), the
  fraction where the implicit reward ranks chosen above rejected: the sign of
  (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected) with a reference (β-free), or of
  log π(chosen) − log π(rejected) without. A tie counts as wrong, as TRL's
  ``rewards/accuracies``.
- :func:`log_samples`: ``samples.jsonl`` of a training run (the generations kept in
  ``eval.json``, before and after) and, with a wandb logger, the same rows as a
  ``wandb.Table`` plus the gold metrics in the run summary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.eval.acceptance import acceptance_summary
from ptlight.engine.logps import completion_logps
from ptlight.model.backbone import eval_mode
from ptlight.runtime.progress import track
from ptlight.rewards import user_text
from ptlight.tasks import Task

SAMPLE_COLUMNS = ("stage", "when", "prompt", "generation", "reward")


@dataclass
class Sample:
    prompt: str
    completion: str
    reward: float


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for sampling inside the block only; the caller's RNG state is restored."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer, prompts: Sequence[Any], *,
    max_new_tokens: int, batch_size: int, do_sample: bool = False, temperature: float = 1.0,
    seed: int | None = None, description: str = "generating",
) -> list[str]:
    """Completions (text, special tokens removed): a message-list prompt goes through the chat
    template with the generation prompt, a string prompt is tokenized as plain text."""
    encoded = [
        tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False).input_ids
        if isinstance(p, list) else tokenizer(p).input_ids
        for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if do_sample else {"do_sample": False})
    starts = range(0, len(order), batch_size)
    with _seeded(seed if do_sample else None, device), eval_mode(model):
        for start in track(starts, description, total=len(starts), unit="batch",
                           show=len(starts) > 1):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, i in enumerate(idx):  # left padding
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attn[row, width - len(encoded[i]):] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), **sampling,
                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    return out


def gold_samples(model: PreTrainedModel, tokenizer, task: Task, cfg: DictConfig,
                 description: str = "gold eval") -> list[Sample]:
    """Every held-out prompt of ``task`` (``eval.num_prompts``) with its generation and gold
    reward, in prompt order."""
    rows = task.make_rows("prompt", cfg.num_prompts, cfg.seed, "heldout")
    prompts = [r["prompt"] for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                           temperature=cfg.temperature, seed=cfg.seed, description=description)
    rewards = task.score(prompts, completions)
    return [Sample(user_text(p), c, r) for p, c, r in zip(prompts, completions, rewards)]


def summarize(samples: list[Sample], num_samples: int, task: Task | None = None
              ) -> dict[str, Any]:
    """``gold/reward`` (mean), ``gold/exact`` (rate of rewards at or above the task's
    ``threshold``; None when the task has none), count, the first samples; plus the task's own
    metrics (the safety task: ``safety/refusal_rate``, ``safety/over_refusal``)."""
    rewards = [s.reward for s in samples]
    threshold = 1.0 if task is None else task.threshold
    return {
        "gold/reward": sum(rewards) / len(rewards),
        "gold/exact": (None if threshold is None
                       else sum(r >= threshold for r in rewards) / len(rewards)),
        **(task.gold_metrics(samples) if task is not None else {}),
        "num_prompts": len(rewards),
        "samples": [s.__dict__ for s in samples[:num_samples]],
    }


def gold_acceptance(samples: Sequence[Sample], task: Task, threshold: float) -> dict[str, Any]:
    """:func:`ptlight.eval.acceptance.acceptance_summary` of gold-scored samples: accepted when the
    gold reward is >= ``threshold``; references from the task's ``reference_answer``."""
    return acceptance_summary([s.reward for s in samples], [s.completion for s in samples],
                              [task.reference_answer(s.prompt) for s in samples], threshold)


def gold_eval(model: PreTrainedModel, tokenizer, task: Task, cfg: DictConfig,
              keep: list[Sample] | None = None) -> dict[str, Any]:
    """Mean gold reward and exact-match rate (+ the task's own metrics, + acceptance at
    ``eval.acceptance.threshold``) on ``eval.num_prompts`` held-out prompts; every scored
    generation is appended to ``keep`` when given (for :func:`win_rate`)."""
    samples = gold_samples(model, tokenizer, task, cfg)
    if keep is not None:
        keep.extend(samples)
    return {**summarize(samples, cfg.num_samples, task),
            **gold_acceptance(samples, task, cfg.acceptance.threshold)}


def win_rate(model: Sequence[Sample], baseline: Sequence[Sample]) -> dict[str, float]:
    """Pairwise outcome of ``model`` vs ``baseline`` on the same prompts, by gold reward."""
    if [s.prompt for s in model] != [s.prompt for s in baseline] or not model:
        raise ValueError("win_rate needs generations of both models on the same prompts")
    wins = sum(m.reward > b.reward for m, b in zip(model, baseline))
    ties = sum(m.reward == b.reward for m, b in zip(model, baseline))
    n = len(model)
    return {"win_rate": wins / n, "tie_rate": ties / n, "loss_rate": (n - wins - ties) / n,
            "num_prompts": n}


def _chosen_minus_rejected(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` log π(chosen) − log π(rejected), summed over completion tokens."""
    device = next(model.parameters()).device
    sums = completion_logps(model, batch["input_ids"].to(device),
                            batch["attention_mask"].to(device),
                            batch["loss_mask"].to(device)).sequence_sum()
    pairs = sums.view(2, -1)  # rows: chosen block, then rejected block
    return (pairs[0] - pairs[1]).float().cpu()


@torch.no_grad()
def preference_accuracy(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], *, total: int,
    reference: PreTrainedModel | None = None,
) -> dict[str, Any]:
    """Fraction of pairs whose implicit reward margin is positive, and the mean margin."""
    margins = []
    for m in (model, reference):
        if m is not None:
            m.eval()
    for batch in track(batches, "preference accuracy", total=total, unit="batch",
                       show=total > 1):
        margin = _chosen_minus_rejected(model, batch)
        if reference is not None:
            margin = margin - _chosen_minus_rejected(reference, batch)
        margins.append(margin)
    if not margins:
        raise ValueError("preference_accuracy got no pairs")
    h = torch.cat(margins)
    return {"accuracy": (h > 0).float().mean().item(), "mean_margin": h.mean().item(),
            "num_pairs": h.numel(),
            "score": "log-ratio vs reference" if reference is not None else "summed log-probs"}


class ValidationSamples(L.Callback):
    """At the end of every validation, generate on the first ``eval.val_samples`` held-out
    prompts, log ``val/gold/reward`` and keep the rows for ``samples.jsonl`` (rank zero only).

    The prompts are the same at every validation, so the rows show one answer evolving.
    """

    def __init__(self, tokenizer, task: Task, cfg: DictConfig, stage: str) -> None:
        self.tokenizer, self.task, self.stage = tokenizer, task, stage
        self.prompts = [r["prompt"] for r in
                        self.task.make_rows("prompt", cfg.val_samples, cfg.seed, "heldout")]
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        completions = generate(pl_module.policy, self.tokenizer, self.prompts,
                               max_new_tokens=self.cfg.max_new_tokens,
                               batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        rewards = self.task.score(self.prompts, completions)
        for p, c, r in zip(self.prompts, completions, rewards):
            self.rows.append({"stage": self.stage, "when": f"step {trainer.global_step}",
                              "prompt": user_text(p), "generation": c, "reward": r})
        pl_module.log("val/gold/reward", sum(rewards) / len(rewards), rank_zero_only=True)
        if self.task.threshold is not None:
            pl_module.log("val/gold/exact", sum(r >= self.task.threshold for r in rewards)
                          / len(rewards), rank_zero_only=True)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_rows(report: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """Rows (``SAMPLE_COLUMNS``) of the generations kept in a run's report: before, at each
    validation (``report["validation_samples"]``), then after."""
    def kept(when: str) -> list[dict[str, Any]]:
        return [{"stage": stage, "when": when, "prompt": s["prompt"],
                 "generation": s["completion"], "reward": s["reward"]}
                for s in report[when]["samples"]] if when in report else []

    return kept("before") + list(report.get("validation_samples", [])) + kept("after")


def log_samples(run_dir: Path, report: dict[str, Any], loggers: Sequence[Logger]) -> None:
    """``samples.jsonl`` (when the run has a gold eval) and, for wandb loggers, a
    ``gold/samples`` table plus ``gold/<when>/<metric>`` summary values."""
    rows = sample_rows(report, report["objective"])
    if not rows:
        return
    write_jsonl(run_dir / "samples.jsonl", rows)
    summary = {f"gold/{when}/{key.split('/')[1]}": report[when][key]
               for when in ("before", "after") if when in report
               for key in ("gold/reward", "gold/exact")}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table("gold/samples", columns=list(SAMPLE_COLUMNS),
                             data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
            logger.experiment.summary.update(summary)
