"""``rm``: reward-model training with a ``scores`` objective (Bradley–Terry ``reward_bt``).

The policy built by the shared backbone builder (an SFT export, usually; LoRA allowed: the
score head then trains alongside the adapter) becomes the backbone of a
:class:`~ptlight.model.reward_model.RewardModel`; every row of a pairwise/listwise batch (completion
k of every example in block k) gets one reward at its last completion token, and the objective
sees them as :class:`~ptlight.objectives.Rewards` ``[B, K]``.

Data: ``method.data`` = ``pairwise`` (default; a ``margin`` column is used when present) or
``listwise`` (K-way comparisons, expanded to all pairs by the objective).

After training, the head's bias is shifted so that the validation completions have mean
reward 0 (OBJECTIVES.md §3: "shift so a reference set has mean reward 0"); the shift is
recorded in ``reward_head.json``. :meth:`RewardMethod.evaluate` measures pairwise accuracy on
held-out pairs of the bundled task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.errors import ConfigError
from ptlight.methods.common import block_columns, check_finite, configure_optim, log_metrics
from ptlight.objectives import Objective, ObjectiveOutput, Rewards
from ptlight.model.reward_model import RewardModel, load_head
from ptlight.runtime.strategy import shard_method, submodule_state

DATA_KINDS = ("pairwise", "listwise")


class RewardMethod(L.LightningModule):
    """Reward model = policy backbone + scalar head, trained on comparisons."""

    data_kinds = ("scores",)
    generates = False  # no gold-metric generation: evaluated by pairwise accuracy instead

    @staticmethod
    def data_kind_for(method_cfg: DictConfig, objective: Objective) -> str:  # noqa: ARG004
        kind = method_cfg.get("data", "pairwise")
        if kind not in DATA_KINDS:
            raise ConfigError(f"method.data={kind!r}: a reward model trains on {DATA_KINDS}")
        return kind

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: Any = None, reference_mode: str = "none",
    ) -> None:
        super().__init__()
        if reference is not None:
            raise ValueError("rm takes no reference model")
        self.model = RewardModel(policy)
        self.objective, self.optim_cfg = objective, optim

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K]`` rewards of a pairwise/listwise batch."""
        r = self.model(batch["input_ids"], batch["attention_mask"])
        return block_columns(r, r.shape[0] // batch["index"].shape[0])

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        b = batch["index"].shape[0]
        lengths = batch["loss_mask"].sum(1)
        inputs = Rewards(rewards=self.rewards(batch), scores=batch.get("scores"),
                         margins=batch.get("margins"),
                         lengths=block_columns(lengths, lengths.shape[0] // b))
        return self.objective(inputs)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out = self.forward_batch(batch)
        log_metrics(self, split, out.loss, out.metrics, batch["index"].shape[0])
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return check_finite(self, self._step(batch, "train"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def fsdp_roots(self) -> list[torch.nn.Module]:
        """The modules ``trainer=fsdp`` shards (:func:`ptlight.runtime.strategy.shard_method`)."""
        return [self.model]

    def configure_model(self) -> None:
        shard_method(self)

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)

    # ---- after training --------------------------------------------------------------------
    @torch.no_grad()
    def on_fit_end(self) -> None:
        """Centre the rewards on the validation completions (mean 0)."""
        dm = self.trainer.datamodule
        if dm is None:
            return
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in dm.val_dataloader():
            batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
            r = self.model(batch["input_ids"], batch["attention_mask"])
            total, count = total + r.sum().item(), count + r.numel()
        self.model.train(was_training)
        if count:
            self.model.center(total / count)

    def export_extras(self, export_dir: Path, state: dict[str, torch.Tensor] | None = None
                      ) -> None:
        """The score head next to the backbone; ``state``: this module's full state dict when
        the head itself holds a shard (FSDP)."""
        head = None if state is None else submodule_state(state, self, self.model.score)
        self.model.save_head(export_dir, head)

    def unsharded(self, backbone: PreTrainedModel, export_dir: Path) -> "RewardMethod":
        """This method around the reward model read back from its export (``backbone`` and the
        saved head): what rank 0 evaluates after FSDP training, whose modules hold shards."""
        method = RewardMethod(backbone, self.objective, self.optim_cfg)
        method.model.score = load_head(export_dir)
        return method

    @torch.no_grad()
    def evaluate(self, tokenizer, task: str, eval_cfg: DictConfig) -> dict[str, Any]:
        """Pairwise accuracy and mean margin on ``eval.num_pairs`` held-out pairs of ``task``."""
        from ptlight.data.shapes import parse_row
        from ptlight.data.tokenize import encode
        from ptlight.tasks import get_task

        rows = get_task(task).make_rows("pairwise", eval_cfg.num_pairs, eval_cfg.seed, "heldout")
        encs = [encode(tokenizer, parse_row(r, "pairwise"), 10**6, "error") for r in rows]
        seqs = [(e.prompt, e.completions[k]) for k in range(2) for e in encs]  # chosen block first
        was_training = self.model.training
        self.model.eval()
        r = block_columns(self.model.score_rows(seqs, tokenizer.pad_token_id,
                                                2 * eval_cfg.batch_size), 2)
        self.model.train(was_training)
        delta = r[:, 0] - r[:, 1]
        return {"rm/accuracy": (delta > 0).float().mean().item(),
                "rm/margin": delta.mean().item(), "num_pairs": len(rows)}
