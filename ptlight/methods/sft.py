"""``sft``: supervised fine-tuning on completion tokens (prompt masked) with any ``sft`` objective."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.logps import completion_logps
from ptlight.methods.common import configure_optim, log_metrics, token_diagnostics
from ptlight.objectives import Objective, TokenLogps


class SFTMethod(L.LightningModule):
    """Policy + token-level objective. Batches: ``input_ids``/``attention_mask``/``loss_mask``."""

    data_kinds = ("sft",)

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: PreTrainedModel | None = None, reference_mode: str = "none",
    ) -> None:
        super().__init__()
        if reference is not None:
            raise ValueError("sft takes no reference model")
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self._smooth = getattr(objective, "label_smoothing", 0.0) > 0

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        scores = completion_logps(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            with_mean_logp=self._smooth,
        )
        inputs = TokenLogps(
            logps=scores.to_dense(), mask=scores.mask,
            mean_logp=scores.to_dense(scores.mean_logp) if self._smooth else None,
        )
        out = self.objective(inputs)
        log_metrics(self, split, out.loss, {**token_diagnostics(scores), **out.metrics},
                    batch["input_ids"].shape[0])
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)
