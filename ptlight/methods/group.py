"""``group``: critic-free RL from rewards — GRPO and its variants, RLOO, REINFORCE++ and online
DPO (OBJECTIVES.md §12, docs/rl.md), Lightning manual optimisation.

One training batch = ``data.batch_size`` prompts, then:

1. **Rollout** (no grad, eval mode): the rollout engine (``method.rollout.engine``, default
   ``hf``: transformers' batched ``generate`` with the KV cache; :mod:`ptlight.engine.rollout`)
   samples ``num_generations`` (G) completions per prompt at ``temperature``, up to
   ``max_new_tokens``; each is cut after its first EOS. Generated tokens/s is logged.
2. **Rewards**: r = Σ_k w_k R_k over the reward plugins of the top-level ``reward`` (one spec,
   or a list of specs each with a ``weight``); a completion no plugin scores is unscorable
   (NaN: advantage 0, outside its group's statistics).
3. **Log-probs at rollout time** under the policy (when the batch is reused: μ =
   ``num_iterations`` > 1 or ``num_mini_batches`` > 1) and the reference (only when the
   objective needs one: β > 0, online DPO), from logits / T as the sampler drew them.
4. **Advantages**: the objective's :meth:`advantages` over the whole rollout batch (group
   statistics, batch scaling, REINFORCE++'s whitening); with several ranks, over every rank's
   rollouts gathered (:func:`gathered_advantages`), as TRL does.
5. **μ iterations** over the batch in ``num_mini_batches`` minibatches of whole groups, each an
   optimiser step: the objective's clipped surrogate (+ β·KL) on a
   :class:`~ptlight.objectives.GroupRollout`; gradient clipping at
   ``trainer.gradient_clip_val``; the engine's :meth:`sync_weights` after each step.

``trainer.max_steps`` counts optimiser steps: each rollout batch makes μ × num_mini_batches of
them. Metrics use TRL's names (``reward``, ``reward_std``, ``rewards/<plugin>/mean``,
``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``,
``clip_ratio/*``, ``kl``, ``entropy``) under ``train/``. Validation decodes each val prompt
greedily and logs ``val/reward`` and ``val/loss`` = −``val/reward`` (what a sweeper minimises).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from ptlight.engine.rollout import Generation, RolloutEngine, build_engine
from ptlight.errors import ConfigError
from ptlight.methods.base import Method
from ptlight.methods.common import RolloutSteps, configure_optim
from ptlight.methods.ppo import packs_rollouts, token_scores
from ptlight.methods.rl import masked_mean
from ptlight.model.reference import Reference
from ptlight.objectives import GroupRollout, Objective
from ptlight.objectives.group import nanstd
from ptlight.rewards import WeightedRewards, build_rewards
from ptlight.runtime.strategy import is_sharded


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[world, *x.shape]``: ``x`` from every rank of the default process group (torch's
    ``all_gather``; Lightning's own goes through a deprecated torch function that warns)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


def gathered_advantages(
    objective: Objective, rewards: torch.Tensor, group_size: int, mask: torch.Tensor,
    logps: torch.Tensor | None, ref_logps: torch.Tensor | None, *,
    all_gather: Callable[[torch.Tensor], torch.Tensor], rank: int,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The objective's :meth:`advantages` over the generation batches of every rank, as TRL
    gathers rewards across processes before computing them: this rank's rows of the result.

    Group statistics are the same either way (a group's completions are on one rank); what
    spans the batch (grpo's ``scale_rewards=batch``, REINFORCE++'s whitening) and the reward
    metrics then see every rank's completions. ``all_gather``: ``tensor -> [world, *shape]``
    (:func:`all_gather`), the same shape on every rank, so the ``[B, T]`` tensors
    are padded to the longest completion of any rank first (masked out: padding is outside
    every statistic) and this rank's columns are cut back out of a ``[B, T]`` result.
    """
    b, t = mask.shape
    sizes = all_gather(torch.tensor([b, t], device=mask.device))  # (world, 2)
    if bool((sizes[:, 0] != b).any()):
        raise RuntimeError(f"ranks hold generation batches of {sizes[:, 0].tolist()} "
                           "completions; the gathered advantages need the same number on each")
    width = int(sizes[:, 1].max())

    def gather(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        if x.dim() == 2:
            x = torch.cat([x, x.new_zeros(b, width - t)], dim=1)
        return all_gather(x).flatten(0, 1)

    full_mask = gather(mask.to(torch.uint8)).bool()  # gloo gathers no bool tensors
    adv, metrics = objective.advantages(gather(rewards), group_size, mask=full_mask,
                                        logps=gather(logps), ref_logps=gather(ref_logps))
    if adv is not None:
        adv = adv[rank * b : (rank + 1) * b]
        adv = adv[:, :t] if adv.dim() == 2 else adv
    return adv, metrics


def rollout_stats(
    adv_metrics: dict[str, torch.Tensor], mask: torch.Tensor, has_eos: torch.Tensor,
    rewards: torch.Tensor, parts: dict[str, torch.Tensor],
    every: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> dict[str, torch.Tensor]:
    """The logged statistics of a rollout batch: the objective's reward metrics, completion
    lengths and clipping, unscorable share, and each reward plugin's mean and std. ``every``
    turns a per-completion tensor of this rank into that of every rank (``all_gather``
    flattened), so that with several ranks they describe all rollouts, as TRL's do and as the
    gathered advantages' reward metrics already do."""
    lengths = every(mask.sum(1).float())
    stats = {
        **{k: v.detach().float() for k, v in adv_metrics.items()},
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/clipped_ratio": every((~has_eos).float()).mean(),
        "rewards/unscorable": torch.isnan(every(rewards)).float().mean(),
    }
    for label, values in parts.items():
        values = every(values)
        ok = ~torch.isnan(values)
        stats[f"rewards/{label}/mean"] = (values[ok].mean() if ok.any()
                                         else torch.tensor(float("nan")))
        stats[f"rewards/{label}/std"] = nanstd(values)
    return stats


class GroupRLMethod(RolloutSteps, Method):
    """Policy (+ reference when the objective needs one) + reward plugins + rollout engine,
    trained with a ``group`` objective."""

    data_kinds = ("group",)
    reference_modes = ("none", "copy", "adapter")

    @classmethod
    def extra_args(cls, cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
        """Reward plugins, rollout engine and settings, checked before any weights load."""
        s = cfg.method.rollout
        name = cfg.method.objective.name
        if s.num_generations < 2:
            raise ConfigError(
                f"method.rollout.num_generations={s.num_generations}: {name} compares the "
                "completions of one prompt with each other (group mean and std, leave-one-out "
                "baseline, pairs), which needs at least 2; set method.rollout.num_generations>=2")
        if name == "online_dpo" and s.num_generations != 2:
            raise ConfigError(f"method.rollout.num_generations={s.num_generations}: online_dpo "
                              "judges a pair per prompt; set method.rollout.num_generations=2")
        if s.num_iterations < 1:
            raise ConfigError(f"method.rollout.num_iterations={s.num_iterations} must be >= 1")
        cls.check_rollout(s, "method.rollout", cfg.data.batch_size, "minibatches hold whole groups")
        if s.max_new_tokens < 1:
            raise ConfigError("method.rollout.max_new_tokens must be >= 1")
        reward_spec = OmegaConf.to_container(cfg.reward, resolve=True)
        return {"rewards": build_rewards(reward_spec, key="reward"), "tokenizer": tokenizer,
                "settings": s, "engine": build_engine(s, "method.rollout"),
                "max_grad_norm": cfg.trainer.get("gradient_clip_val")}

    def __init__(self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
                 reference: Reference, rewards: WeightedRewards, tokenizer: Any,
                 settings: DictConfig, engine: RolloutEngine,
                 max_grad_norm: float | None = None) -> None:
        super().__init__(policy, objective, optim, reference)
        self.check_reference(reference.mode, objective)
        self.automatic_optimization = False
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self.rewards, self.tokenizer, self.s, self.engine = rewards, tokenizer, settings, engine
        self.max_grad_norm = max_grad_norm
        # method.rollout.pack: the scoring runs each prompt once with its G completions
        self.pack_group = (settings.num_generations
                           if settings.get("pack") is True and packs_rollouts(policy) else None)

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        self.rewards.to(self.device)

    def fsdp_roots(self) -> list[torch.nn.Module]:
        return [self.policy]

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)

    # ---- rollout ---------------------------------------------------------------------------
    def _generate(self, batch: dict[str, Any], n: int, temperature: float) -> Generation:
        tok, s = self.tokenizer, self.s
        return self.engine.generate(
            self.policy, batch["input_ids"], batch["attention_mask"], n=n,
            max_new_tokens=s.max_new_tokens, temperature=temperature, top_p=s.top_p,
            top_k=s.top_k, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            # sharded (FSDP) ranks gather each layer together: all decode to the longest
            synced_gpus=is_sharded(self.policy) and self.trainer.world_size > 1)

    def _score(self, batch: dict[str, Any], gen: Generation, n: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        texts = [self.tokenizer.decode(c[m], skip_special_tokens=True).strip()
                 for c, m in zip(gen.completions, gen.completion_mask)]
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        total, parts = self.rewards(prompts, texts)
        return total.to(self.device), {k: v.to(self.device) for k, v in parts.items()}

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Sample G completions per prompt, score them, and compute what the updates need."""
        s, G = self.s, self.s.num_generations
        gen = self._generate(batch, G, s.temperature)
        rewards, parts = self._score(batch, gen, G)
        mask = gen.completion_mask
        reuse = s.num_iterations * s.num_mini_batches > 1
        needs_ref = bool(self.objective.needs_reference)
        old_logps = ref_logps = None
        if reuse or needs_ref:
            # one packing for the policy and the reference
            layout = self.scoring_layout(gen.sequences, gen.attention_mask, gen.n_prompt)
            old_logps, _, _ = token_scores(self.policy, gen.sequences, gen.attention_mask,
                                           gen.n_prompt, s.temperature, layout=layout)
            if needs_ref:
                with self.reference.scope() as ref:
                    ref_logps, _, _ = token_scores(ref, gen.sequences, gen.attention_mask,
                                                   gen.n_prompt, s.temperature, layout=layout)
        if self.trainer.world_size > 1:
            advantages, adv_metrics = gathered_advantages(
                self.objective, rewards, G, mask, old_logps, ref_logps,
                all_gather=all_gather, rank=self.trainer.global_rank)
            every = lambda x: all_gather(x).flatten(0, 1)  # noqa: E731
        else:
            advantages, adv_metrics = self.objective.advantages(
                rewards, G, mask=mask, logps=old_logps, ref_logps=ref_logps)
            every = lambda x: x  # noqa: E731
        stats = {**rollout_stats(adv_metrics, mask, gen.has_eos, rewards, parts, every),
                 "rollout/tokens_per_s": torch.tensor(gen.num_tokens / max(gen.seconds, 1e-9)),
                 "rollout/seconds": torch.tensor(gen.seconds)}
        return {"gen": gen, "rewards": rewards, "advantages": advantages,
                "old_logps": old_logps if reuse else None, "ref_logps": ref_logps,
                "stats": stats}

    # ---- optimisation ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch)
        gen: Generation = roll["gen"]
        s, G = self.s, self.s.num_generations
        n_prompts = gen.sequences.shape[0] // G
        per_mb = n_prompts // s.num_mini_batches
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        for idx in self.minibatches(n_prompts, per_mb, s.num_iterations, group=G):
            mask = gen.completion_mask[idx]
            seqs, attn = gen.sequences[idx], gen.attention_mask[idx]
            logps, entropy, _ = token_scores(self.policy, seqs, attn, gen.n_prompt,
                                             s.temperature,
                                             layout=self.scoring_layout(seqs, attn, gen.n_prompt))
            tokens = mask.sum().float()
            # the dapo normaliser: active tokens of this optimiser step over all ranks,
            # per rank (DDP averages the ranks' gradients)
            num_items = self.trainer.strategy.reduce(tokens, reduce_op="sum") \
                if self.trainer.world_size > 1 else tokens
            out = self.objective(GroupRollout(
                logps=logps, mask=mask,
                advantages=None if roll["advantages"] is None else roll["advantages"][idx],
                old_logps=None if roll["old_logps"] is None else roll["old_logps"][idx],
                ref_logps=None if roll["ref_logps"] is None else roll["ref_logps"][idx],
                rewards=roll["rewards"][idx], group_size=G,
                max_completion_length=s.max_new_tokens,
                num_items_in_batch=float(num_items) / self.trainer.world_size
                if self.trainer.world_size > 1 else float(num_items)))
            metrics = dict(out.metrics)
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
            self.optimiser_step(out.loss)
            self.engine.sync_weights(self.policy)
            metrics["loss"] = out.loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            steps += 1
        self.log_rollout_step(sums, steps, roll["stats"], gen.sequences.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():
            gen = self._generate(batch, 1, 0.0)
            rewards, _ = self._score(batch, gen, 1)
        ok = ~torch.isnan(rewards)
        reward = rewards[ok].mean() if ok.any() else torch.tensor(0.0, device=self.device)
        n = rewards.shape[0]
        self.log_dict({"val/reward": reward.float(), "val/loss": -reward.float()},
                      on_epoch=True, batch_size=n, sync_dist=True)
