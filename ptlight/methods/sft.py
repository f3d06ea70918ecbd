"""``sft``: supervised fine-tuning on completion tokens (prompt masked) with any ``sft`` objective.

Token objectives (``sft``) get :class:`~ptlight.objectives.TokenLogps` from one forward pass.
An objective with ``passes = 2`` (``rdrop``) gets two dropout-on forward passes in training,
as full-vocabulary logits at the completion positions (:class:`RDropInputs`); in validation the
model is in eval mode, so one pass serves as both. R-Drop needs active dropout: when the
policy has none (LFM2 has no dropout at all; ``model.disable_dropout=true`` zeroes
``torch.nn.Dropout`` layers), a warning at fit start says that R-Drop reduces to SFT.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.engine.logps import completion_logits, completion_logps
from ptlight.methods.base import Method
from ptlight.methods.common import (ObjectiveSteps, configure_optim, token_diagnostics,
                                    wants_diagnostics)
from ptlight.model.reference import NoReference, Reference
from ptlight.objectives import Objective, ObjectiveOutput, TokenLogps
from ptlight.objectives.rdrop import RDropInputs


def active_dropout(model: torch.nn.Module) -> float:
    """Largest dropout probability the model applies in training mode: ``torch.nn.Dropout``
    layers, plus the float ``attention_dropout`` attribute that attention modules of many
    transformers models pass to their functional attention (0.0 when there is none)."""
    probs = [0.0]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            probs.append(module.p)
        attn = getattr(module, "attention_dropout", None)
        if isinstance(attn, float):
            probs.append(attn)
    return max(probs)


class SFTMethod(ObjectiveSteps, Method):
    """Policy + token-level objective. Batches: ``input_ids``/``attention_mask``/``loss_mask``."""

    data_kinds = ("sft",)

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: Reference | None = None,
    ) -> None:
        super().__init__(policy, objective, optim, reference or NoReference())
        if self.reference.exists:
            raise ValueError("sft takes no reference model")
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self._smooth = getattr(objective, "label_smoothing", 0.0) > 0
        self._passes = getattr(objective, "passes", 1)
        if self._passes not in (1, 2):
            raise ValueError(f"{objective.name}: passes={self._passes}; sft supports 1 or 2")

    def on_fit_start(self) -> None:
        if self._passes == 2 and active_dropout(self.policy) == 0.0:
            rank_zero_warn(
                f"{self.objective.name}: dropout is 0 in this policy, so both passes are "
                "identical and R-Drop reduces to SFT (the consistency term is 0). LFM2 has no "
                "dropout layers; for a model that has them, keep model.disable_dropout=false."
            )

    def _token_forward(self, batch: dict[str, torch.Tensor], split: str
                       ) -> tuple[ObjectiveOutput, dict]:
        diagnostics = wants_diagnostics(self, split)
        scores = completion_logps(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            with_mean_logp=self._smooth, with_diagnostics=diagnostics,
            index=batch.get("completion_index"),
        )
        inputs = TokenLogps(
            logps=scores.to_dense(), mask=scores.mask,
            mean_logp=scores.to_dense(scores.mean_logp) if self._smooth else None,
        )
        return self.objective(inputs), token_diagnostics(scores) if diagnostics else {}

    def _two_pass_forward(self, batch: dict[str, torch.Tensor]) -> tuple[ObjectiveOutput, dict]:
        args = (self.policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                batch.get("completion_index"))
        first = completion_logits(*args)
        second = completion_logits(*args) if self.policy.training else first
        inputs = RDropInputs(
            logits_1=first.logits, logits_2=second.logits, targets=first.targets,
            example_index=first.rows, batch_size=batch["input_ids"].shape[0],
        )
        return self.objective(inputs), {}  # the objective reports accuracy/entropy itself

    def forward_batch(self, batch: dict[str, torch.Tensor], split: str = "train"
                      ) -> tuple[ObjectiveOutput, dict]:
        """The objective's output on one batch and the token diagnostics to log with it."""
        if self._passes == 2:
            return self._two_pass_forward(batch)
        return self._token_forward(batch, split)

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def fsdp_roots(self) -> list[torch.nn.Module]:
        return [self.policy]

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)
