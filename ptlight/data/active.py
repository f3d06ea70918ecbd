"""Active sampling: draw the training prompts the policy is uncertain about (``data.sampler``).

``+data/sampler=active`` (``conf/data/sampler/active.yaml``) replaces the uniform shuffle of the
training loader for preference methods (pairwise, listwise, unpaired rows) and PPO (prompts).
The loss is unchanged; only which examples form the batches changes.

Every ``refresh_every`` batches the sampler:

1. draws a candidate pool of ``pool_size`` examples uniformly (seeded by ``data.seed``);
2. scores each candidate's prompt with the *current* policy (the LightningModule's ``policy``):

   - ``score=entropy`` (APL, Muldrew et al. 2024, arXiv 2402.08114): predictive entropy
     Ĥ(x) = −(1/N) Σ_n log π(y_n | x) over ``num_samples`` completions sampled at
     ``sample_temperature`` (their log-probs come from the same ``generate`` call);
   - ``score=ensemble``: disagreement of a reward-model ensemble (``ensemble``: a list of
     ``ptlight.rewards`` specs, e.g. reward models trained with different seeds): the mean over
     the N sampled completions of the standard deviation of the ensemble's rewards (the
     uncertainty that Double Thompson Sampling, arXiv 2402.00396, exploits);

3. standardises the pool's priorities (z-scores, so ``temperature`` does not depend on their
   scale) and draws ``refresh_every × data.batch_size`` examples from the pool without
   replacement with probability ∝ softmax(z / ``temperature``). A low temperature approaches
   APL's "keep the top-entropy prompts"; a high one approaches uniform sampling.

Each refresh logs ``sampler/priority_mean`` (raw priorities of the pool), ``sampler/priority_
selected`` (of the drawn examples), ``sampler/entropy`` (of the sampling distribution, in
nats; uniform over the pool = log(pool_size)) to the run's loggers at the current step, and
appends one line to ``<run dir>/sampler.jsonl`` with the step and every candidate's index,
priority and whether it was drawn.

An epoch is ``len(train)`` examples as with uniform shuffling (``trainer.max_steps`` budgets
are comparable); pools are drawn independently, so an example may come twice in an epoch and
another not at all (within one pool there are no repeats). Generation for the scores costs extra compute, which the evidence script
(``scripts/active_report.py``) reports as wall time. Single process only: ``trainer.devices``
> 1 is refused (the pool is not split across ranks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from ptlight.errors import ConfigError
from ptlight.model.backbone import eval_mode

SCORES = ("entropy", "ensemble")


def check_settings(s: DictConfig) -> None:
    """Errors that name the ``data.sampler.*`` key."""
    if s.get("name") != "active":
        raise ConfigError(f"data.sampler.name={s.get('name')!r}; the only sampler besides the "
                          "uniform shuffle (data.sampler=null) is 'active' (+data/sampler=active)")
    if s.score not in SCORES:
        raise ConfigError(f"data.sampler.score={s.score!r}; use one of {SCORES}")
    for key in ("num_samples", "pool_size", "refresh_every", "max_new_tokens", "batch_size"):
        if s[key] < 1:
            raise ConfigError(f"data.sampler.{key}={s[key]} must be >= 1")
    if s.temperature <= 0 or s.sample_temperature <= 0:
        raise ConfigError("data.sampler.temperature and sample_temperature must be > 0")
    if s.score == "ensemble" and len(s.ensemble or []) < 2:
        raise ConfigError("data.sampler.score=ensemble needs data.sampler.ensemble: a list of "
                          "at least 2 reward specs ({name: reward_model, path: ...})")


def softmax_weights(priorities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) of the standardised priorities (uniform when they are all equal)."""
    std = priorities.std() if priorities.numel() > 1 else priorities.new_tensor(0.0)
    z = (priorities - priorities.mean()) / std if std > 0 else torch.zeros_like(priorities)
    return torch.softmax(z / temperature, dim=0)


@torch.no_grad()
def sample_with_logps(model, prompts: list[list[int]], pad_id: int, eos_id: int, *,
                      num_samples: int, max_new_tokens: int, temperature: float, batch_size: int
                      ) -> tuple[list[list[list[int]]], torch.Tensor]:
    """``num_samples`` sampled completions (token ids, cut after EOS) of each tokenized prompt,
    and their summed log-probs ``[P, N]`` under ``model`` (logits / ``temperature``)."""
    from ptlight.data.module import left_pad

    device = next(model.parameters()).device
    completions: list[list[list[int]]] = []
    sums = []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            batch = left_pad(chunk, pad_id)
            out = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                eos_token_id=eos_id, pad_token_id=pad_id, return_dict_in_generate=True,
                output_logits=True,
            )
            new = out.sequences[:, batch["input_ids"].shape[1]:]
            logits = torch.stack(out.logits, dim=1).float() / temperature  # [P*N, T, V]
            logps = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
            is_eos = new == eos_id
            keep = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0  # up to the first EOS
            sums.append((logps * keep).sum(1).view(len(chunk), num_samples).cpu())
            for row, k in zip(new, keep):
                completions.append(row[k].tolist())
    grouped = [completions[j * num_samples : (j + 1) * num_samples] for j in range(len(prompts))]
    return grouped, torch.cat(sums)


class ActiveSampler(Sampler[int]):
    """Indices of training examples, drawn refresh by refresh from scored pools (module doc)."""

    def __init__(self, datamodule: Any, settings: DictConfig) -> None:
        check_settings(settings)
        self.dm, self.s = datamodule, settings
        self.n = len(datamodule.train)
        self.generator = torch.Generator().manual_seed(int(datamodule.cfg.seed))
        self._ensemble = None
        self.refreshes = 0

    def __len__(self) -> int:
        return self.n

    # ---- priorities ------------------------------------------------------------------------
    def _policy(self):
        trainer = self.dm.trainer
        module = trainer.lightning_module if trainer is not None else None
        if module is None or not hasattr(module, "policy"):
            raise ConfigError("data.sampler=active scores prompts with the method's policy; it "
                              "only works inside training (a method with a `policy`)")
        return module.policy

    def priorities(self, indices: list[int]) -> torch.Tensor:
        """``[len(indices)]`` priority of each example's prompt under the current policy."""
        items = [self.dm.train[i] for i in indices]
        tok = self.dm.tokenizer
        groups, sums = sample_with_logps(
            self._policy(), [it.enc.prompt for it in items], tok.pad_token_id, tok.eos_token_id,
            num_samples=self.s.num_samples, max_new_tokens=self.s.max_new_tokens,
            temperature=self.s.sample_temperature, batch_size=self.s.batch_size)
        if self.s.score == "entropy":
            return -sums.mean(1)
        return self._disagreement(items, groups)

    def _disagreement(self, items: list[Any], groups: list[list[list[int]]]) -> torch.Tensor:
        from ptlight.rewards import build_reward

        if self._ensemble is None:
            device = next(self._policy().parameters()).device
            self._ensemble = [
                build_reward(OmegaConf.to_container(spec, resolve=True),
                             key=f"data.sampler.ensemble[{k}]").to(device)
                for k, spec in enumerate(self.s.ensemble)]
        tok = self.dm.tokenizer
        prompts = [self._prompt_of(it) for it in items for _ in range(self.s.num_samples)]
        texts = [tok.decode(c, skip_special_tokens=True).strip() for g in groups for c in g]
        rewards = torch.stack([r(prompts, texts) for r in self._ensemble])  # [M, P*N]
        return rewards.std(0).view(len(items), self.s.num_samples).mean(1)

    def _prompt_of(self, item: Any) -> Any:
        """The prompt as reward plugins take it: the raw prompt (prompt-only data), else the
        user turn recovered from the prompt tokens (single-turn chat prompts)."""
        if item.prompt is not None:
            return item.prompt
        text = self.dm.tokenizer.decode(item.enc.prompt, skip_special_tokens=False)
        return [{"role": "user", "content": user_turn(self.dm.tokenizer, text)}]

    # ---- drawing ---------------------------------------------------------------------------
    def _log(self, pool: list[int], prios: torch.Tensor, weights: torch.Tensor,
             chosen: list[int]) -> None:
        trainer = self.dm.trainer
        step = trainer.global_step if trainer is not None else 0
        picked = set(chosen)
        entropy = float(-(weights * weights.clamp_min(1e-30).log()).sum())
        metrics = {"sampler/priority_mean": float(prios.mean()),
                   "sampler/priority_selected": float(prios[[pool.index(i) for i in chosen]].mean()),
                   "sampler/entropy": entropy}
        if trainer is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "sampler.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "score": self.s.score, **metrics,
                                    "max_entropy": math.log(len(pool)),
                                    "index": pool, "priority": [round(float(p), 4) for p in prios],
                                    "drawn": [i in picked for i in pool]}) + "\n")

    def __iter__(self) -> Iterator[int]:
        trainer = self.dm.trainer
        if trainer is not None and trainer.world_size > 1:
            raise ConfigError("data.sampler=active runs in one process; use trainer.devices=1")
        per_refresh = self.s.refresh_every * self.dm.cfg.batch_size
        emitted = 0
        while emitted < self.n:
            take = min(per_refresh, self.n - emitted)
            pool_size = min(max(self.s.pool_size, take), self.n)
            pool = torch.randperm(self.n, generator=self.generator)[:pool_size].tolist()
            prios = self.priorities(pool)
            weights = softmax_weights(prios, self.s.temperature)
            picks = torch.multinomial(weights, take, replacement=False, generator=self.generator)
            chosen = [pool[i] for i in picks.tolist()]
            self._log(pool, prios, weights, chosen)
            self.refreshes += 1
            emitted += take
            yield from chosen


def user_turn(tokenizer: Any, rendered: str) -> str:
    """The user text of a rendered single-turn chat prompt: the template is rendered around a
    marker to find what precedes and follows the user's text; anything else is returned as is."""
    marker = "\x00PTLIGHT\x00"
    shell = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                          add_generation_prompt=True, tokenize=False)
    head, tail = shell.split(marker, 1)
    if rendered.startswith(head) and rendered.endswith(tail) and len(rendered) >= len(head) + len(tail):
        return rendered[len(head): len(rendered) - len(tail)]
    return rendered.strip()


def active_loader(datamodule: Any) -> DataLoader:
    """The training loader with :class:`ActiveSampler` (what ``train_dataloader`` returns when
    ``data.sampler`` is set)."""
    return DataLoader(list(enumerate(datamodule.train)), batch_size=datamodule.cfg.batch_size,
                      sampler=ActiveSampler(datamodule, datamodule.cfg.sampler),
                      collate_fn=datamodule.collate,
                      drop_last=datamodule._drop_last(len(datamodule.train)),
                      pin_memory=datamodule.pin_memory)
