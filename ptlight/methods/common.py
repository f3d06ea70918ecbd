"""Plain functions the method modules share: optimiser, metric logging, diagnostics, and the
non-finite loss guard (:func:`check_finite`)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_scheduler

from ptlight.runtime import progress
from ptlight.runtime.callbacks import run_guard
from ptlight.engine.logps import TokenScores
from ptlight.engine.packing import RolloutLayout, rollout_layout
from ptlight.engine.offload import DiskAdamW


def configure_optim(module: L.LightningModule, cfg: DictConfig, fused_on_cpu: bool = False
                    ) -> dict:
    """AdamW over trainable parameters plus a transformers LR schedule stepped every step.

    ``method.optim``: ``lr``, ``weight_decay`` (not applied to biases and norms), ``betas``,
    ``scheduler`` (cosine | linear | constant_with_warmup | ...), ``warmup_ratio``; and
    ``offload_dir``, which :func:`ptlight.train.train_stage` sets from the root key
    ``optimizer_offload``: AdamW's moments then live in a file there (:mod:`ptlight.engine.offload`).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.get("offload_dir"):  # root key optimizer_offload: the moments live on disk
        opt = DiskAdamW(groups, offload_dir=cfg.offload_dir, lr=cfg.lr, betas=tuple(cfg.betas))
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        # Fused AdamW (one kernel over all tensors; TRL/transformers' default optimiser since
        # torch 2.8) for CUDA parameters, FSDP2 shards (DTensors) included, and for CPU ones
        # where the method asks (``fused_on_cpu``: the preference methods, ~6x faster optimiser
        # steps there). The update equals torch's default within fp rounding, but greedy gold
        # evaluations of a small model amplify rounding, so the CPU result tables of sft, rm
        # and ppo (docs/results.md) keep the implementation they were measured with. Set on the groups
        # rather than the constructor, which would flag the optimiser as unscaling AMP
        # gradients itself (Lightning then refuses gradient clipping); before the first step,
        # so the state is created for it.
        devices = ("cpu", "cuda") if fused_on_cpu else ("cuda",)
        params = [p for g in groups for p in g["params"]]
        if params and all(p.device.type in devices
                          and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                          for p in params):
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False
    total = int(module.trainer.estimated_stepping_batches)
    sched = get_scheduler(
        cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total),
        num_training_steps=total,
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def wants_diagnostics(module: L.LightningModule, split: str) -> bool:
    """Whether a step computes its token diagnostics (:func:`token_diagnostics`): always in
    validation (epoch means), and in training on the steps whose values reach the loggers
    (:func:`ptlight.runtime.progress.logs_this_step`). They cost passes over the
    ``[tokens × vocabulary]`` log-probabilities (an exponential, a product, a sum, an
    argmax) that the loss does not need, and a step that logs nothing would drop them."""
    return split != "train" or progress.logs_this_step(module)


def token_diagnostics(scores: TokenScores) -> dict[str, torch.Tensor]:
    """``mean_token_accuracy``, ``entropy`` and ``num_tokens`` over the scored tokens."""
    n = scores.correct.numel()
    if n == 0:
        zero = torch.zeros((), device=scores.logps.device)
        return {"mean_token_accuracy": zero, "entropy": zero, "num_tokens": zero}
    return {
        "mean_token_accuracy": scores.correct.float().mean(),
        "entropy": scores.entropy.mean(),
        "num_tokens": scores.logps.new_full((), float(n)),  # a fill, not a copy from the host
    }


def block_columns(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[K·B]`` rows (block k = completion k of every example, as the data module collates
    them) -> ``[B, K]``."""
    return values.view(k, -1).T


def check_finite(module: L.LightningModule, loss: torch.Tensor) -> torch.Tensor:
    """Hand the training loss to the run's :class:`~ptlight.runtime.callbacks.NonFiniteGuard`; returns
    ``loss`` unchanged.

    Call it on every training loss, where the method computes it::

        return check_finite(self, loss)            # automatic optimisation: training_step
        self.manual_backward(check_finite(self, loss)); opt.step()   # manual optimisation

    A non-finite loss makes the guard skip (``nonfinite.policy=skip``: no weight moves, the step
    is counted in ``train/skipped_steps``) or stop (``stop``) at the next optimizer step, on every
    rank together. Gradients are checked at every optimizer step without any call. Without a
    guard in the trainer's callbacks (a bare ``lightning.Trainer``) this does nothing.
    """
    guard = run_guard(module._trainer)
    if guard is not None:
        guard.observe_loss(loss)
    return loss


def log_metrics(
    module: L.LightningModule, split: str, loss: torch.Tensor, metrics: dict[str, torch.Tensor],
    batch_size: int,
) -> None:
    """Log ``<split>/loss`` and ``<split>/<name>``: per step in training, epoch means in val.

    In training the metrics are logged on the steps whose values reach the loggers
    (:func:`ptlight.runtime.progress.logs_this_step`); the loss every step (a callback that
    monitors it sees each step's), shown by the progress bar on the logged steps. Under
    DDP/FSDP every value is the mean over ranks (``sync_dist``), so ``train/loss`` is the loss
    of the global batch, as in a one-process run (no-op with one process).
    """
    train = split == "train"
    if train and not progress.logs_this_step(module):
        metrics = {}
    values = {f"{split}/{k}": v.detach().float() for k, v in metrics.items()}
    if values:
        module.log_dict(values, on_step=train, on_epoch=not train, batch_size=batch_size,
                        sync_dist=True)
    # the training loss reaches the bar through progress.TrainingBar, on the logged steps
    module.log(f"{split}/loss", loss.detach(), prog_bar=not train, on_step=train,
               on_epoch=not train, batch_size=batch_size, sync_dist=True)


class ObjectiveSteps:
    """``training_step`` / ``validation_step`` of a method whose step is one objective call.

    The method provides ``forward_batch(batch, split) -> (ObjectiveOutput, diagnostics)`` and,
    when its batches have no ``index`` column, ``batch_size(batch)``. Each step logs
    ``<split>/loss`` and the objective's metrics and diagnostics (:func:`log_metrics`); the
    training loss goes through :func:`check_finite`; gradients are freed right after each
    optimiser step rather than in the next step's closure.
    """

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["index"].shape[0]

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out, diagnostics = self.forward_batch(batch, split)  # type: ignore[attr-defined]
        log_metrics(self, split, out.loss, {**diagnostics, **out.metrics},  # type: ignore[arg-type]
                    self.batch_size(batch))
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return check_finite(self, self._step(batch, "train"))  # type: ignore[arg-type]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        # Lightning zeroes gradients inside the next closure, after the next forward, so the
        # spent gradients would sit in memory through it (+1x the trainable weights at the
        # peak). They are consumed here: free them now (the later zero_grad is a no-op).
        optimizer.zero_grad(set_to_none=True)


class RolloutSteps:
    """What the methods that sample their own training data share (``ppo``, ``group``): they
    read prompts, use a reference only live (rollouts are new every step: nothing to
    precompute), and optimise manually, one rollout batch making several optimiser steps that
    are clipped here (Lightning's automatic clipping does not run under manual optimisation)."""

    reference_modes: tuple[str, ...] = ("copy", "adapter")
    max_grad_norm: float | None = None
    # completions per prompt when the method scores its rollouts packed (its ``pack`` setting
    # on, a model that packs), else None
    pack_group: int | None = None

    def scoring_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       n_prompt: int) -> RolloutLayout | None:
        """These rollout rows packed for ``token_scores`` (:func:`rollout_layout`), or None
        where the method scores them padded."""
        if self.pack_group is None:
            return None
        return rollout_layout(input_ids, attention_mask, n_prompt, self.pack_group)

    @classmethod
    def data_kind_for(cls, method_cfg: DictConfig, objective) -> str:
        return "prompt"

    @classmethod
    def check_reference(cls, mode: str, objective) -> None:
        if mode not in cls.reference_modes:
            from ptlight.errors import ConfigError

            raise ConfigError(f"method.reference={mode} cannot serve {objective.name}: rollouts "
                              "are new every step, so there is nothing to precompute; use "
                              "method.reference=copy (adapter with LoRA)")

    @staticmethod
    def check_rollout(settings: DictConfig, key: str, batch_size: int, batch: str) -> None:
        """``<key>.num_mini_batches`` divides the rollout batch (``batch`` says what a
        minibatch holds), ``<key>.temperature`` samples, and the ``top_p`` / ``top_k``
        filters (where the method has them) keep at least one token."""
        from ptlight.errors import ConfigError

        if settings.num_mini_batches < 1 or batch_size % settings.num_mini_batches:
            raise ConfigError(f"{key}.num_mini_batches={settings.num_mini_batches} must divide "
                              f"data.batch_size={batch_size} ({batch})")
        if settings.temperature <= 0:
            raise ConfigError(f"{key}.temperature must be > 0 (rollouts sample)")
        top_p = settings.get("top_p", 1.0)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ConfigError(f"{key}.top_p={top_p!r}: nucleus sampling keeps the smallest set of "
                              f"tokens whose probability reaches top_p, a number in (0, 1]; "
                              f"{key}.top_p=1.0 turns the filter off")
        pack = settings.get("pack", False)
        if pack not in (True, False, "auto"):
            raise ConfigError(f"{key}.pack={pack!r}: whether the scoring runs each prompt once "
                              f"with its completions packed; use auto, true or false")
        top_k = settings.get("top_k", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ConfigError(f"{key}.top_k={top_k!r}: sample from the k most likely tokens, a "
                              f"whole number >= 1; {key}.top_k=0 turns the filter off")

    @classmethod
    def trainer_overrides(cls, cfg: DictConfig) -> dict:
        # clipped per optimiser step by the method; one training batch is a whole rollout
        # batch (several optimiser steps), so its metrics are logged every time
        return {"gradient_clip_val": None, "log_every_n_steps": 1}

    def optimiser_step(self, loss: torch.Tensor) -> None:
        """One manual optimiser step on ``loss``: backward (a non-finite loss or gradient is
        skipped or stops the run, per ``nonfinite.policy``), clip by norm at
        ``trainer.gradient_clip_val``, AdamW step, and the LR schedule while it lasts."""
        module: L.LightningModule = self  # type: ignore[assignment]
        opt, sched = module.optimizers(), module.lr_schedulers()
        opt.zero_grad()
        module.manual_backward(check_finite(module, loss))
        if self.max_grad_norm:
            module.clip_gradients(opt, gradient_clip_val=self.max_grad_norm,
                                  gradient_clip_algorithm="norm")
        opt.step()
        if sched.last_epoch < int(module.trainer.estimated_stepping_batches):
            sched.step()

    def minibatches(self, units: int, per_step: int, passes: int, group: int = 1
                    ) -> Iterator[torch.Tensor]:
        """Row indices of each optimiser step of a rollout batch: ``passes`` shuffled passes
        over ``units`` units of ``group`` contiguous rows (GRPO: the G completions of a
        prompt), ``per_step`` units a step."""
        device = self.device  # type: ignore[attr-defined]
        offsets = torch.arange(group, device=device)
        for _ in range(passes):
            order = torch.randperm(units, device=device)
            for start in range(0, units, per_step):
                chosen = order[start : start + per_step]
                yield (chosen[:, None] * group + offsets).reshape(-1)

    def log_rollout_step(self, sums: dict[str, torch.Tensor], steps: int,
                         stats: dict[str, torch.Tensor], batch_size: int,
                         totals: tuple[str, ...] = ()) -> None:
        """Log a rollout batch: the mean over its ``steps`` optimiser steps of each summed
        metric (``totals``: logged as summed), and the rollout's own ``stats``."""
        module: L.LightningModule = self  # type: ignore[assignment]
        logged = {f"train/{k}": v / (1 if k in totals else steps) for k, v in sums.items()}
        logged.update({f"train/{k}": v.float() for k, v in stats.items()})
        loss = logged.pop("train/loss")
        if progress.logs_this_step(module):
            module.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        module.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=batch_size)
