"""``ppo``: RLHF with PPO (docs/rlhf.md), Lightning manual optimisation.

One training batch = one rollout batch of prompts (``data.batch_size``), then
``method.ppo.num_ppo_epochs`` passes over it in ``num_mini_batches`` minibatches:

1. **Rollout** (no grad, eval mode): the rollout engine (``method.ppo.engine``, default
   ``hf``, :mod:`ptlight.engine.rollout`) samples a response per prompt with
   ``generate`` and its KV cache (LFM2's conv cache included) at ``temperature``, up to
   ``max_new_tokens``. Prompts are left-padded; positions follow the attention mask, so a
   padded row gets exactly the tokens and log-probs it would get alone (tested). The response
   is cut after its first EOS.
2. **Scores**: the reward source, the top-level ``reward`` config group (a ``ptlight.rewards``
   plugin: the task's ``gold`` reward, a trained ``reward_model`` export with ``reward.path``, or
   a third party's; built in train.py, handed to the method as an object) scores the decoded
   responses. A response with no EOS scores ``penalty_reward_value`` (−1), or, when
   ``missing_eos_penalty`` is set, its score minus that amount (TRL's two options).
3. **Log-probs and values** of the response tokens under the policy (from logits / T, as the
   sampler drew them), the reference (frozen copy, or the LoRA policy with adapters off), and
   the value head (a linear head on the policy's last hidden states, trained with it; with LoRA
   it trains alongside the adapter).
4. **Rewards**: r_t = −β·kl_t + [t = last]·score (kl estimator ``kl_estimator``: k1/k2/k3),
   optionally divided by their std (``whiten_rewards``); **GAE** (γ, λ) gives advantages
   (whitened over valid tokens) and returns.
5. **PPO epochs**: the ``ppo`` objective (clipped policy + value loss) on each minibatch;
   backward, gradient clipping at ``trainer.gradient_clip_val`` (applied here: Lightning's
   automatic clipping does not run under manual optimisation), optimiser and LR-scheduler step.
   With ``ptx_coef`` > 0 each minibatch also adds ``ptx_coef`` × the token NLL of a batch of
   SFT demonstrations (PPO-ptx, InstructGPT).
6. **KL controller**: fixed β (``kl_coef``), or adaptive (``adaptive_kl``: initial ``kl_coef``,
   ``kl_target``, ``kl_horizon``) updated after each rollout batch; β is a buffer, so it is
   checkpointed.

``trainer.max_steps`` counts optimiser steps, as everywhere in Lightning: each rollout batch
makes ``num_ppo_epochs × num_mini_batches`` of them. Validation samples the val prompts the
same way and logs ``val/objective/scores``, ``val/objective/kl`` and
``val/loss`` = −(score − β·KL), the negated RLHF objective (what a sweeper minimises).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ptlight.engine.logps import _has_linear_head, backbone_hidden, target_logps
from ptlight.engine.packing import RolloutLayout, packed_hidden, supports_packing
from ptlight.engine.rollout import HFGenerate, RolloutEngine, build_engine
from ptlight.errors import ConfigError
from ptlight.methods.base import Method
from ptlight.methods.common import RolloutSteps, configure_optim
from ptlight.model.reference import Reference
from ptlight.objectives import Objective, Rollout
from ptlight.rewards import Reward, build_reward
from ptlight.methods.rl import (AdaptiveKLController, FixedKLController, gae, kl_penalty,
                        masked_mean, masked_whiten, token_rewards)
from ptlight.runtime.strategy import is_sharded, submodule_state
from ptlight.runtime.validate import boolean, finite_number, whole_number

VALUE_HEAD = "value_head.safetensors"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the mask (left padding: the first real token is position 0), as
    ``generate`` computes them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 n_prompt: int, temperature: float, value_head: torch.nn.Module | None = None,
                 *, layout: RolloutLayout | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, N]`` (from logits / ``temperature``) and entropies (detached: a
    metric) of the tokens after the first ``n_prompt`` columns, and the value head's
    predictions at the states that emit them (or None). The LM head runs in row chunks
    (:func:`ptlight.engine.logps.target_logps`): the backward keeps at most one fp32
    ``[B, N, V]`` log-softmax, none once it would pass 1 GiB (the chunks are recomputed).

    ``layout``: these rows packed (:func:`ptlight.engine.packing.rollout_layout`, for a model
    that :func:`packs_rollouts`): each prompt once with its completions as branches, no
    padding; the tokens after a completion's EOS score 0 there, and everything else equals
    the plain path within fp tolerance (tested)."""
    head = model.get_output_embeddings()
    if layout is not None:
        h = packed_hidden(model, layout.packed)  # (M, H): the state before each token
        logps, entropy = target_logps(h, layout.packed.targets, head.weight, head.bias,
                                      temperature)
        values = None if value_head is None else layout.dense(
            value_head(h.to(value_head.weight.dtype)).squeeze(-1).float())
        return layout.dense(logps), layout.dense(entropy), values
    h = backbone_hidden(model, input_ids, attention_mask, position_ids(attention_mask))
    h = h[:, n_prompt - 1 : -1]  # the states that predict response tokens
    targets = input_ids[:, n_prompt:]
    logps, entropy = target_logps(h.reshape(-1, h.shape[-1]), targets.reshape(-1),
                                  head.weight, head.bias, temperature)
    values = None if value_head is None else value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps.view(targets.shape), entropy.view(targets.shape), values


def packs_rollouts(model: PreTrainedModel) -> bool:
    """Whether :func:`token_scores` can score ``model``'s rollouts packed (LFM2, a linear
    head)."""
    return supports_packing(model) and _has_linear_head(model)


def check_ppo_settings(s: DictConfig) -> None:
    """``method.ppo`` numbers a PPO run needs in range (before any weights load)."""
    key = "method.ppo"
    whole_number(s.max_new_tokens, f"{key}.max_new_tokens", 1, "the response length cap")
    whole_number(s.num_ppo_epochs, f"{key}.num_ppo_epochs", 1,
                 "optimisation passes over each rollout batch")
    finite_number(s.gamma, f"{key}.gamma", 0.0, 1.0, False, "the discount", "1.0")
    finite_number(s.lam, f"{key}.lam", 0.0, 1.0, False, "GAE's lambda", "0.95")
    finite_number(s.kl_coef, f"{key}.kl_coef", 0.0, None, False, "the KL penalty's coefficient",
                  "0.05")
    finite_number(s.ptx_coef, f"{key}.ptx_coef", 0.0, None, False,
                  "the weight of the SFT loss (PPO-ptx)", "0.0")
    finite_number(s.penalty_reward_value, f"{key}.penalty_reward_value", -math.inf, None, True,
                  "the score of a response with no EOS", "-1.0")
    if s.missing_eos_penalty is not None:
        finite_number(s.missing_eos_penalty, f"{key}.missing_eos_penalty", 0.0, None, False,
                      "the amount taken off a response with no EOS "
                      "(null: use penalty_reward_value)", "1.0")
    if boolean(s.adaptive_kl, f"{key}.adaptive_kl", "the adaptive KL controller on or off"):
        finite_number(s.kl_target, f"{key}.kl_target", 0.0, None, True,
                      "the adaptive KL controller's target KL", "6.0")
        finite_number(s.kl_horizon, f"{key}.kl_horizon", 0.0, None, True,
                      "the adaptive KL controller's horizon", "10000")


class PPOMethod(RolloutSteps, Method):
    """Policy + value head + reference + reward plugin, trained with a ``rollout`` objective."""

    data_kinds = ("rollout",)
    reference_modes = ("copy", "adapter")

    @classmethod
    def extra_args(cls, cfg: DictConfig, tokenizer) -> dict[str, Any]:
        """The reward plugin and the settings (checked before any weights load)."""
        settings = cfg.method.ppo
        cls.check_rollout(settings, "method.ppo", cfg.data.batch_size, "the rollout batch")
        if settings.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"method.ppo.kl_estimator={settings.kl_estimator!r}; use k1, k2 or k3")
        check_ppo_settings(settings)
        if cfg.data.batch_size < 8:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size}: PPO whitens advantages over the rollout "
                "batch, which needs at least 8 samples per device; set data.batch_size>=8")
        reward = build_reward(OmegaConf.to_container(cfg.reward, resolve=True), key="reward")
        ptx = None
        if settings.ptx_coef > 0:
            from ptlight.data.module import PtlDataModule

            ptx_cfg = cfg.data.copy()
            if settings.ptx_data_path:
                ptx_cfg.path = settings.ptx_data_path
            ptx = PtlDataModule(ptx_cfg, tokenizer, "sft")
            ptx.setup()
        return {"reward": reward, "tokenizer": tokenizer, "settings": settings,
                "engine": build_engine(settings, "method.ppo"),
                "max_grad_norm": cfg.trainer.get("gradient_clip_val"), "ptx": ptx}

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: Reference, reward: Reward, tokenizer, settings: DictConfig,
        max_grad_norm: float | None = None, ptx: Any = None,
        engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__(policy, objective, optim, reference)
        self.check_reference(reference.mode, objective)
        self.automatic_optimization = False
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self.reward, self.tokenizer, self.s = reward, tokenizer, settings
        # method.ppo.pack: the scoring runs the rollouts packed, without padding
        self.pack_group = 1 if settings.get("pack") is True and packs_rollouts(policy) else None
        self.engine = engine if engine is not None else HFGenerate()
        self.max_grad_norm = max_grad_norm
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.kl_ctl = (AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
                       if settings.adaptive_kl else FixedKLController(settings.kl_coef))
        self.register_buffer("kl_coef", torch.tensor(float(settings.kl_coef)))
        self._ptx = ptx
        self._ptx_iter = None

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        self.reward.to(self.device)
        self.kl_ctl.value = float(self.kl_coef)  # restored from a checkpoint when resuming

    def fsdp_roots(self) -> list[torch.nn.Module]:
        return [self.policy, self.value_head]

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sample responses, score them, and compute KL-penalised rewards, values and GAE."""
        s, tok = self.s, self.tokenizer
        ids, attn = batch["input_ids"], batch["attention_mask"]
        n_prompt = ids.shape[1]
        gen = self.engine.generate(
            self.policy, ids, attn, n=1, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=1.0, top_k=0, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            # sharded (FSDP) ranks gather each layer together: all decode to the longest
            synced_gpus=is_sharded(self.policy) and self.trainer.world_size > 1)
        responses, mask, has_eos = gen.completions, gen.completion_mask, gen.has_eos
        seqs, full_attn = gen.sequences, gen.attention_mask

        texts = [tok.decode(r[m], skip_special_tokens=True).strip()
                 for r, m in zip(responses, mask)]
        scores = self.reward(batch["prompts"], texts).to(self.device)
        if s.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - s.missing_eos_penalty)
        else:
            scores = torch.where(has_eos, scores, torch.full_like(scores, s.penalty_reward_value))

        layout = self.scoring_layout(seqs, full_attn, n_prompt)
        logps, _, values = token_scores(self.policy, seqs, full_attn, n_prompt, s.temperature,
                                        self.value_head, layout=layout)
        with self.reference.scope() as ref:
            ref_logps, _, _ = token_scores(ref, seqs, full_attn, n_prompt, s.temperature,
                                           layout=layout)
        fmask = mask.float()
        kl = kl_penalty(logps, ref_logps, s.kl_estimator) * fmask
        beta = self.kl_ctl.value
        rewards = token_rewards(kl, scores, mask, beta)
        if s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values * fmask, mask, s.gamma, s.lam)
        advantages = masked_whiten(advantages, mask)
        kl_seq = kl.sum(1)
        non_score = (-beta * kl).sum(1)
        stats = {
            "objective/kl": kl_seq.mean(),
            "objective/kl_coef": torch.tensor(beta),
            "objective/entropy": (-logps * fmask).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/scores": scores.mean(),
            "objective/rlhf_reward": (scores + non_score).mean(),
            "val/num_eos_tokens": has_eos.float().sum(),
            "response_length": fmask.sum(1).mean(),
            "rollout/tokens_per_s": torch.tensor(gen.num_tokens / max(gen.seconds, 1e-9)),
        }
        return {"seqs": seqs, "attn": full_attn, "mask": mask, "logps": logps,
                "values": values * fmask, "advantages": advantages, "returns": returns,
                "n_prompt": n_prompt, "stats": stats,
                "kl_seq": kl_seq, "scores": scores}

    # ---- optimisation ----------------------------------------------------------------------
    def _ptx_nll(self) -> torch.Tensor:
        from ptlight.engine.logps import completion_logps

        if self._ptx_iter is None:
            self._ptx_iter = iter(self._ptx.train_dataloader())
        try:
            batch = next(self._ptx_iter)
        except StopIteration:
            self._ptx_iter = iter(self._ptx.train_dataloader())
            batch = next(self._ptx_iter)
        batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
        scores = completion_logps(self.policy, batch["input_ids"], batch["attention_mask"],
                                  batch["loss_mask"], with_diagnostics=False)
        return -scores.logps.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch)
        s = self.s
        b = roll["seqs"].shape[0]
        mb = b // s.num_mini_batches
        n_prompt = roll["n_prompt"]
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for idx in self.minibatches(b, mb, s.num_ppo_epochs):
            seqs, attn = roll["seqs"][idx], roll["attn"][idx]
            logps, entropy, values = token_scores(
                self.policy, seqs, attn, n_prompt, s.temperature, self.value_head,
                layout=self.scoring_layout(seqs, attn, n_prompt))
            out = self.objective(Rollout(
                logps=logps, old_logps=roll["logps"][idx], values=values,
                old_values=roll["values"][idx], advantages=roll["advantages"][idx],
                returns=roll["returns"][idx], mask=roll["mask"][idx]))
            loss = out.loss
            metrics = dict(out.metrics)
            metrics["policy/entropy"] = masked_mean(entropy.detach(), roll["mask"][idx])
            if self._ptx is not None:
                nll = self._ptx_nll()
                loss = loss + s.ptx_coef * nll
                metrics["loss/ptx"] = nll.detach()
            self.optimiser_step(loss)
            metrics["loss"] = loss.detach()
            if n == 0:
                metrics["first_ratio"] = metrics["val/ratio"]  # ≡ 1 (nothing updated yet)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n += 1
        self.kl_ctl.update(float(roll["kl_seq"].mean()), b)
        self.kl_coef.fill_(self.kl_ctl.value)
        self.log_rollout_step(sums, n, roll["stats"], b, totals=("first_ratio",))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        roll = self.rollout(batch)
        st = roll["stats"]
        b = roll["seqs"].shape[0]
        beta = self.kl_ctl.value
        values = {"val/objective/scores": st["objective/scores"],
                  "val/objective/kl": st["objective/kl"],
                  "val/loss": -(roll["scores"] - beta * roll["kl_seq"]).mean()}
        self.log_dict({k: v.float() for k, v in values.items()}, on_epoch=True, batch_size=b,
                      sync_dist=True)

    def export_extras(self, export_dir: Path, state: dict[str, torch.Tensor] | None = None
                      ) -> None:
        """``value_head.safetensors`` next to the policy (PPO's critic, for continued runs);
        ``state``: this module's full state dict when the head holds a shard (FSDP)."""
        head = (dict(self.value_head.named_parameters()) if state is None
                else submodule_state(state, self, self.value_head))
        save_file({k: head[k].detach().float().cpu().contiguous() for k in ("weight", "bias")},
                  str(export_dir / VALUE_HEAD))
