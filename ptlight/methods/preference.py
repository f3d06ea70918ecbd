"""``preference``: one module drives every pairwise, listwise and unpaired objective.

Batches come from :meth:`ptlight.data.module.PtlDataModule.collate`; one policy forward scores
every row, and the per-row summed log-probs are reshaped by data kind:

- ``pairwise``: ``[2B]`` rows (chosen block, rejected block) -> ``Logps.policy [B, 2]``.
- ``listwise``: ``[K·B]`` rows (K blocks, best first) -> ``[B, K]``, with ``Logps.scores``
  ``[B, K]`` from the batch.
- ``unpaired``: ``[2B]`` rows, the examples then the mismatched block (prompt j with the
  completion of example j−1) -> ``policy [B, 1]``, ``labels [B]`` and ``kl_policy [B]``
  (detached: KTO's reference point takes no gradient; the mismatched rows share the forward
  pass instead of a second ``no_grad`` one, which costs their activation memory).

The reference log-probs come from, by ``method.reference``:

- ``copy``: a frozen copy of the starting policy, run under ``no_grad`` in the training
  precision; kept outside the module's registered children so checkpoints carry it once.
- ``adapter``: with LoRA (``model.lora.enabled``), the policy itself with its adapters disabled
  (the base), or with its frozen starting adapter active when ``model.path`` was an adapter
  (:class:`ptlight.backbone.AdapterReference`); no second copy of the weights. Chosen
  automatically when LoRA is on and ``method.reference=copy``.
- ``precompute``: the same frozen copy (with LoRA: the adapter reference) scores the whole
  train and val sets once before training (same precision), then is freed; batches look the
  values up by example index. Not for unpaired data: its mismatched rows change with every
  shuffled batch.
- ``none``: no reference (reference-free objectives such as SimPO/ORPO); an objective with
  ``needs_reference = True`` refuses this before any weights load.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.backbone import AdapterReference, reference_scope
from ptlight.errors import ConfigError
from ptlight.logps import TokenScores, completion_logps
from ptlight.methods.common import check_finite, configure_optim, log_metrics, token_diagnostics
from ptlight.objectives import Logps, Objective, ObjectiveOutput
from ptlight.progress import MANY_ITEMS, track

REFERENCE_MODES = ("copy", "adapter", "precompute", "none")


def _columns(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[K·B]`` (block k = completion k of every example) -> ``[B, K]``."""
    return values.view(k, -1).T


def _first_rows(scores: TokenScores, n: int) -> TokenScores:
    """The tokens of rows ``< n`` only (diagnostics leave out the mismatched KTO rows)."""
    keep = scores.rows < n
    mean_logp = scores.mean_logp[keep] if scores.mean_logp is not None else None
    return TokenScores(scores.logps[keep], scores.rows[keep], scores.correct[keep],
                       scores.entropy[keep], mean_logp, scores.mask[:n])


class PreferenceMethod(L.LightningModule):
    """Policy (+ reference) + a pairwise, listwise or unpaired sequence-level objective."""

    data_kinds = ("pairwise", "listwise", "unpaired")

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: PreTrainedModel | AdapterReference | None = None,
        reference_mode: str = "copy",
    ) -> None:
        super().__init__()
        if reference_mode == "precompute" and objective.data_kind == "unpaired":
            raise ConfigError(
                f"method.reference=precompute cannot serve {objective.name!r}: the mismatched "
                "prompt/completion rows of unpaired data change with every shuffled batch; "
                "use method.reference=copy"
            )
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self.data_kind = objective.data_kind
        self.reference_mode = reference_mode
        self._reference = [reference]  # a list: not a registered child, not in the state dict
        self._ref_cache: dict[str, torch.Tensor] = {}

    # ---- reference ----------------------------------------------------------------------
    def _reference_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[R]`` summed completion log-probs of every row under the reference (the frozen
        copy, or the LoRA policy with adapters switched for the duration of the call)."""
        with torch.no_grad(), reference_scope(self._reference[0]) as reference:
            scores = completion_logps(
                reference, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            )
        return scores.sequence_sum()

    def on_fit_start(self) -> None:
        ref = self._reference[0]
        if ref is None:
            return
        ref.to(self.device)
        if self.reference_mode == "precompute":
            dm = self.trainer.datamodule
            with self.trainer.precision_plugin.forward_context():
                for split, loader in dm.ordered_loaders().items():
                    cache = None
                    for batch in track(loader, f"reference log-probs ({split})",
                                       total=len(loader), unit="batch",
                                       show=len(loader.dataset) > MANY_ITEMS):
                        batch = {k: v.to(self.device) for k, v in batch.items()}
                        b = batch["index"].shape[0]
                        sums = self._reference_sums(batch)
                        if cache is None:  # [N, K]
                            cache = sums.new_zeros(len(loader.dataset), sums.shape[0] // b)
                        cache[batch["index"]] = _columns(sums, sums.shape[0] // b)
                    self._ref_cache[split] = cache
            self._reference[0] = None  # frees the copy: the cache is all we need

    def _reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        """``[R]`` reference sums of every row (same layout as the policy's), or None."""
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "precompute":
            return self._ref_cache[split][batch["index"]].T.reshape(-1)  # [B, K] -> [K·B]
        return self._reference_sums(batch)

    # ---- steps --------------------------------------------------------------------------
    def _logps(
        self, batch: dict[str, torch.Tensor], policy: torch.Tensor, reference: torch.Tensor | None,
        lengths: torch.Tensor,
    ) -> Logps:
        """Reshape per-row sums ``[R]`` into the objective's :class:`Logps` (see module doc)."""
        b = batch["index"].shape[0]
        if self.data_kind == "unpaired":
            return Logps(
                policy=policy[:b, None],
                reference=None if reference is None else reference[:b, None],
                lengths=lengths[:b, None],
                labels=batch["labels"],
                kl_policy=policy[b:].detach(),
                kl_reference=None if reference is None else reference[b:],
            )
        k = policy.shape[0] // b
        columns = _columns(policy, k)
        return Logps(
            policy=columns,
            reference=None if reference is None else _columns(reference, k),
            lengths=_columns(lengths, k),
            scores=batch.get("scores"),
            chosen_nll=-columns[:, 0] / _columns(lengths, k)[:, 0].clamp(min=1),
        )

    def forward_batch(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[ObjectiveOutput, dict[str, torch.Tensor]]:
        """The objective's output on one batch and the token diagnostics of its examples."""
        scores = completion_logps(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        inputs = self._logps(batch, scores.sequence_sum(), self._reference_logps(batch, split),
                             scores.lengths())
        out = self.objective(inputs)
        if self.data_kind == "unpaired":
            scores = _first_rows(scores, batch["index"].shape[0])
        return out, token_diagnostics(scores)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        out, diagnostics = self.forward_batch(batch, split)
        log_metrics(self, split, out.loss, {**diagnostics, **out.metrics},
                    batch["index"].shape[0])
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return check_finite(self, self._step(batch, "train"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg)
