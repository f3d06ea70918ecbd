"""``preference``: one module drives every pairwise objective of the DPO family.

Each batch holds B pairs as ``[2B, T]`` rows (chosen block first, then rejected). One policy
forward scores both halves; the reference log-probs come from, by ``method.reference``:

- ``copy``: a frozen copy of the starting policy, run under ``no_grad`` in the training
  precision; kept outside the module's registered children so checkpoints carry it once.
- ``precompute``: the same frozen copy scores the whole train and val sets once before training
  (same precision), then is freed; batches look the values up by example index.
- ``none``: no reference (reference-free objectives such as SimPO/ORPO); an objective with
  ``needs_reference = True`` refuses this before any weights load.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.logps import completion_logps
from ptlight.methods.common import configure_optim, log_metrics, token_diagnostics
from ptlight.objectives import Logps, Objective

REFERENCE_MODES = ("copy", "precompute", "none")


def _pairs(values: torch.Tensor) -> torch.Tensor:
    """``[2B]`` (chosen block, rejected block) -> ``[B, 2]``."""
    return values.view(2, -1).T


class PreferenceMethod(L.LightningModule):
    """Policy (+ reference) + a pairwise objective."""

    data_kinds = ("pairwise",)

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: PreTrainedModel | None = None, reference_mode: str = "copy",
    ) -> None:
        super().__init__()
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self.reference_mode = reference_mode
        self._reference = [reference]  # a list: not a registered child, not in the state dict
        self._ref_cache: dict[str, torch.Tensor] = {}

    # ---- reference ----------------------------------------------------------------------
    def _reference_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ref = self._reference[0]
        with torch.no_grad():
            scores = completion_logps(
                ref, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
            )
        return _pairs(scores.sequence_sum())

    def on_fit_start(self) -> None:
        ref = self._reference[0]
        if ref is None:
            return
        ref.to(self.device)
        if self.reference_mode == "precompute":
            dm = self.trainer.datamodule
            with self.trainer.precision_plugin.forward_context():
                for split, loader in dm.ordered_loaders().items():
                    cache = torch.zeros(len(loader.dataset), 2, device=self.device)
                    for batch in loader:
                        batch = {k: v.to(self.device) for k, v in batch.items()}
                        cache[batch["index"]] = self._reference_scores(batch)
                    self._ref_cache[split] = cache
            self._reference[0] = None  # frees the copy: the cache is all we need

    def _reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "precompute":
            return self._ref_cache[split][batch["index"]]
        return self._reference_scores(batch)

    # ---- steps --------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        scores = completion_logps(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        lengths = scores.lengths()
        policy = _pairs(scores.sequence_sum())
        chosen_len = _pairs(lengths)[:, 0].clamp(min=1)
        inputs = Logps(
            policy=policy,
            reference=self._reference_logps(batch, split),
            lengths=_pairs(lengths),
            chosen_nll=-policy[:, 0] / chosen_len,
        )
        out = self.objective(inputs)
        log_metrics(self, split, out.loss, {**token_diagnostics(scores), **out.metrics},
                    policy.shape[0])
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)
