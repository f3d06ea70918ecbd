"""``rm``: reward-model training with a ``scores`` objective (Bradley–Terry ``reward_bt``).

The policy built by the shared backbone builder (an SFT export, usually; LoRA allowed: the
score head then trains alongside the adapter) becomes the backbone of a
:class:`~ptlight.model.reward_model.RewardModel`; every row of a pairwise/listwise batch (completion
k of every example in block k) gets one reward at its last completion token, and the objective
sees them as :class:`~ptlight.objectives.Rewards` ``[B, K]``.

Data: ``method.data`` = ``pairwise`` (default; a ``margin`` column is used when present) or
``listwise`` (K-way comparisons, expanded to all pairs by the objective).

After training, the head's bias is shifted so that the validation completions have mean
reward 0 (a reference set at mean reward 0, as in the Llama 2 reward models); the shift is
recorded in ``reward_head.json``. :meth:`RewardMethod.evaluate` measures pairwise accuracy on
held-out pairs of the bundled task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.errors import ConfigError
from ptlight.methods.base import Method
from ptlight.methods.common import ObjectiveSteps, block_columns, configure_optim
from ptlight.model.backbone import eval_mode
from ptlight.model.reference import NoReference, Reference
from ptlight.model.reward_model import RewardModel, load_head
from ptlight.objectives import Objective, ObjectiveOutput, Rewards
from ptlight.runtime.strategy import submodule_state

DATA_KINDS = ("pairwise", "listwise")


class RewardMethod(ObjectiveSteps, Method):
    """Reward model = policy backbone + scalar head, trained on comparisons."""

    data_kinds = ("scores",)
    generates = False  # no gold-metric generation: evaluated by pairwise accuracy instead

    @classmethod
    def data_kind_for(cls, method_cfg: DictConfig, objective: Objective) -> str:
        kind = method_cfg.get("data", "pairwise")
        if kind not in DATA_KINDS:
            raise ConfigError(f"method.data={kind!r}: a reward model trains on {DATA_KINDS}")
        return kind

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: Reference | None = None,
    ) -> None:
        super().__init__(policy, objective, optim, reference or NoReference())
        if self.reference.exists:
            raise ValueError("rm takes no reference model")
        self.model = RewardModel(policy)
        self.objective, self.optim_cfg = objective, optim

    def rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K]`` rewards of a pairwise/listwise batch."""
        r = self.model(batch["input_ids"], batch["attention_mask"])
        return block_columns(r, r.shape[0] // batch["index"].shape[0])

    def forward_batch(self, batch: dict[str, torch.Tensor], split: str = "train"
                      ) -> tuple[ObjectiveOutput, dict]:
        """The objective's output on one batch (the objective reports its own metrics)."""
        b = batch["index"].shape[0]
        lengths = batch["loss_mask"].sum(1)
        inputs = Rewards(rewards=self.rewards(batch), scores=batch.get("scores"),
                         margins=batch.get("margins"),
                         lengths=block_columns(lengths, lengths.shape[0] // b))
        return self.objective(inputs), {}

    def fsdp_roots(self) -> list[torch.nn.Module]:
        return [self.model]

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)

    # ---- after training --------------------------------------------------------------------
    @torch.no_grad()
    def on_fit_end(self) -> None:
        """Centre the rewards on the validation completions (mean 0)."""
        dm = self.trainer.datamodule
        if dm is None:
            return
        total, count = 0.0, 0
        with eval_mode(self.model):
            for batch in dm.val_dataloader():
                batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
                r = self.model(batch["input_ids"], batch["attention_mask"])
                total, count = total + r.sum().item(), count + r.numel()
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
    def evaluate(self, tokenizer, task: Any, eval_cfg: DictConfig) -> dict[str, Any] | None:
        """Pairwise accuracy and mean margin on ``eval.num_pairs`` held-out pairs of ``task``
        (a :class:`ptlight.tasks.Task`); None when the task makes no pairs or
        ``eval.num_pairs=0``."""
        from ptlight.data.shapes import parse_row
        from ptlight.data.tokenize import encode

        if "pairwise" not in task.kinds or eval_cfg.num_pairs == 0:
            return None
        rows = task.make_rows("pairwise", eval_cfg.num_pairs, eval_cfg.seed, "heldout")
        encs = [encode(tokenizer, parse_row(r, "pairwise"), 10**6, "error") for r in rows]
        seqs = [(e.prompt, e.completions[k]) for k in range(2) for e in encs]  # chosen block first
        with eval_mode(self.model):
            r = block_columns(self.model.score_rows(seqs, tokenizer.pad_token_id,
                                                    2 * eval_cfg.batch_size), 2)
        delta = r[:, 0] - r[:, 1]
        return {"rm/accuracy": (delta > 0).float().mean().item(),
                "rm/margin": delta.mean().item(), "num_pairs": len(rows)}
