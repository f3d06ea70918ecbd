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
  (:class:`ptlight.model.backbone.AdapterReference`); no second copy of the weights. Chosen
  automatically when LoRA is on and ``method.reference=copy``.
- ``precompute``: the reference (with LoRA: the adapter reference) scores the whole train
  and val sets once before training (same precision); batches look the values up by example
  index. A fresh run scores them with the policy itself (in eval mode, before its first step:
  the same weights), so no copy is ever made; a resumed run (or a cache miss on resume) uses
  a frozen copy of the starting weights, freed after the precompute. Not for unpaired data:
  its mismatched rows change with every shuffled batch.
- ``none``: no reference (reference-free objectives such as SimPO/ORPO); an objective with
  ``needs_reference = True`` refuses this before any weights load.

Fast path (docs/performance.md), each equal to the plain path within fp tolerance:

- ``method.pack`` (default ``auto``: on the CPU; on one CUDA GPU with a precomputed
  reference): every prompt runs once with its completions as branches, packed without
  padding into rows of ``method.pack_max_tokens`` tokens, for the policy and the reference
  alike (:mod:`ptlight.engine.packing`; LFM2's short convolutions never see another branch or
  sequence). Models it does not support take the plain path. The layout is built by the data
  module's collate, on the host; ``method.pack_multiple_of`` rounds the packed width up so
  that batches repeat a few shapes.
- ``method.reference_cache``: with ``precompute``, the reference log-probs are saved to disk
  under a key of everything they depend on (:mod:`ptlight.engine.refcache`); a later run with the same
  reference, data and precision (say, a sweep over ``beta`` or objectives) loads them and never
  runs the reference at all.
- The reference forward always runs under ``no_grad`` in the training precision and skips the
  token diagnostics; only completion positions reach the LM head (:mod:`ptlight.engine.logps`).

Objectives that declare ``token_terms`` (SparsePO, TDPO) get a
:class:`~ptlight.objectives.tokens.TokenTerms` instead of :class:`Logps`: the reference's
hidden states at the completion positions (``no_grad``), then the policy's per-token terms,
reduced chunk by chunk from hidden states and LM heads (:mod:`ptlight.engine.token_terms`),
packed like the sequence path when ``method.pack`` is on.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.engine import refcache
from ptlight.engine.logps import TokenScores, completion_logps
from ptlight.engine.packing import supports_packing
from ptlight.engine.token_terms import completion_terms, reference_side
from ptlight.errors import ConfigError
from ptlight.methods.base import Method
from ptlight.methods.common import (ObjectiveSteps, block_columns, configure_optim,
                                    token_diagnostics, wants_diagnostics)
from ptlight.model.reference import NoReference, Precomputed, Reference
from ptlight.objectives import Logps, Objective, ObjectiveOutput
from ptlight.objectives.tokens import REFERENCE_TERMS
from ptlight.runtime.progress import MANY_ITEMS, track
from ptlight.runtime.devices import auto_pack_multiple_of
from ptlight.runtime.validate import check_pack


def _first_rows(scores: TokenScores, n: int) -> TokenScores:
    """The tokens of rows ``< n`` only (diagnostics leave out the mismatched KTO rows)."""
    keep = scores.rows < n
    mean_logp = scores.mean_logp[keep] if scores.mean_logp is not None else None
    return TokenScores(scores.logps[keep], scores.rows[keep], scores.correct[keep],
                       scores.entropy[keep], mean_logp, scores.mask[:n])


class PreferenceMethod(ObjectiveSteps, Method):
    """Policy (+ reference) + a pairwise, listwise or unpaired sequence-level objective."""

    data_kinds = ("pairwise", "listwise", "unpaired")
    reference_modes = ("copy", "adapter", "precompute", "none")
    _config_keys = ("pack", "pack_max_tokens", "pack_multiple_of", "reference_cache")

    @classmethod
    def check_reference(cls, mode: str, objective: Objective) -> None:
        super().check_reference(mode, objective)
        if mode == "precompute" and objective.data_kind == "unpaired":
            raise ConfigError(
                f"method.reference=precompute cannot serve {objective.name!r}: the mismatched "
                "prompt/completion rows of unpaired data change with every shuffled batch; "
                "use method.reference=copy"
            )

    @classmethod
    def extra_args(cls, cfg: DictConfig, tokenizer) -> dict:
        return {k: cfg.method[k] for k in cls._config_keys if k in cfg.method}

    def __init__(
        self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
        reference: Reference | None = None, pack: bool | str = False,
        pack_max_tokens: int = 2048, pack_multiple_of: int | str = 1,
        reference_cache: str | None = None,
    ) -> None:
        super().__init__(policy, objective, optim, reference or NoReference())
        self.check_reference(self.reference.mode, objective)
        self.policy, self.objective, self.optim_cfg = policy, objective, optim
        self.data_kind = objective.data_kind
        check_pack(pack, pack_max_tokens, pack_multiple_of)
        self.pack, self.pack_max_tokens = pack, int(pack_max_tokens)
        self.pack_multiple_of = pack_multiple_of  # auto: settled in setup, by device
        self.reference_cache = reference_cache
        self.reference_cache_hit: bool | None = None  # set by a precompute: file found or not
        if "hidden" in objective.token_terms:  # e.g. learnable masks: layers sized here
            objective.bind_hidden_size(policy.config.hidden_size)

    def _scores(self, model, batch: dict[str, torch.Tensor], diagnostics: bool) -> TokenScores:
        """Completion-token scores of every row, packed when ``method.pack`` is on."""
        k = batch["input_ids"].shape[0] // batch["index"].shape[0]
        return completion_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
            with_diagnostics=diagnostics, pack=k if self.packs else None,
            pack_max_tokens=self.pack_max_tokens, packed=batch.get("packed"),
            index=batch.get("completion_index"),
        )

    @property
    def packs(self) -> bool:
        """``method.pack``. A training stage settles ``auto`` first
        (:func:`ptlight.runtime.devices.data_defaults`: on the CPU, 5x the padded step's
        pairs/s; on one CUDA GPU with a precomputed reference, 1.46x on an H200;
        docs/performance.md); left unsettled it packs. Models without a packed forward run
        padded either way."""
        return self.pack == "auto" or bool(self.pack)

    def setup(self, stage: str) -> None:
        """Packing: the data module builds each batch's packed layout in its collate (on the
        host, ahead of the step), for the sequence-sum path and the per-token one
        (:mod:`ptlight.engine.token_terms`) alike."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.packs and supports_packing(self.policy) and hasattr(datamodule, "pack_rows"):
            multiple = self.pack_multiple_of
            if multiple == "auto":  # a training stage resolves it first (runtime.devices)
                multiple = auto_pack_multiple_of(self.trainer.strategy.root_device.type == "cuda")
            datamodule.pack_rows = {"max_tokens": self.pack_max_tokens,
                                    "multiple_of": int(multiple)}

    # ---- reference ----------------------------------------------------------------------
    def _reference_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[R]`` summed completion log-probs of every row under the reference model."""
        with torch.no_grad(), self.reference.scope() as reference:
            scores = self._scores(reference, batch, diagnostics=False)
        return scores.sequence_sum()

    def _reference_key(self, loaders: dict) -> tuple[str, dict[str, str]]:
        """Disk-cache key of the precomputed reference (see :mod:`ptlight.engine.refcache`)."""
        ref = self.reference
        assert isinstance(ref, Precomputed)
        meta = {
            "reference_weights": refcache.weights_fingerprint(ref.weights()),
            "reference_kind": ref.scorer_kind,
            "data_kind": self.data_kind,
            "precision": str(self.trainer.precision),
            "device": self.device.type,
            **{f"tokens_{s}": refcache.batches_fingerprint(l) for s, l in loaders.items()},
        }
        return refcache.cache_key(**meta), meta

    def _precompute(self, loaders: dict) -> dict[str, torch.Tensor]:
        out = {}
        with self.trainer.precision_plugin.forward_context():
            for split, loader in loaders.items():
                cache = None
                for batch in track(loader, f"reference log-probs ({split})",
                                   total=len(loader), unit="batch",
                                   show=len(loader.dataset) > MANY_ITEMS):
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    b = batch["index"].shape[0]
                    sums = self._reference_sums(batch)
                    if cache is None:  # [N, K]
                        cache = sums.new_zeros(len(loader.dataset), sums.shape[0] // b)
                    cache[batch["index"]] = block_columns(sums, sums.shape[0] // b)
                out[split] = cache
        return out

    def on_fit_start(self) -> None:
        ref = self.reference
        ref.to(self.device)
        if not isinstance(ref, Precomputed) or ref.scorer is None:
            return
        loaders = self.trainer.datamodule.ordered_loaders()
        cached = key = None
        if self.reference_cache:
            key, meta = self._reference_key(loaders)
            cached = refcache.load(self.reference_cache, key)
            self.reference_cache_hit = cached is not None
        if cached is not None:
            print(f"[ptlight] reference log-probs: loaded "
                  f"{refcache.cache_path(self.reference_cache, key)}")
            ref.values = {s: v.to(self.device) for s, v in cached.items()}
        else:
            if ref.scorer.mode == "policy" and self.trainer.global_step:  # a fresh run only
                raise RuntimeError("the policy can only score the reference before its "
                                   "first step (train_stage keeps a copy to resume)")
            ref.values = self._precompute(loaders)
            if key is not None and self.trainer.is_global_zero:
                path = refcache.save(self.reference_cache, key, ref.values, meta)
                print(f"[ptlight] reference log-probs: saved {path}")
        ref.release()  # the values are all we need from here on: a copy's memory goes back

    def _reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        """``[R]`` reference sums of every row (same layout as the policy's), or None."""
        if not self.reference.exists:
            return None
        if isinstance(self.reference, Precomputed):
            return self.reference.lookup(split, batch["index"])
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
        columns = block_columns(policy, k)
        return Logps(
            policy=columns,
            reference=None if reference is None else block_columns(reference, k),
            lengths=block_columns(lengths, k),
            scores=batch.get("scores"),
            chosen_nll=-columns[:, 0] / block_columns(lengths, k)[:, 0].clamp(min=1),
        )

    def forward_batch(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[ObjectiveOutput, dict[str, torch.Tensor]]:
        """The objective's output on one batch and the token diagnostics of its examples."""
        if self.objective.token_terms:
            return self._token_terms_forward(batch)
        diagnostics = wants_diagnostics(self, split)
        scores = self._scores(self.policy, batch, diagnostics=diagnostics)
        inputs = self._logps(batch, scores.sequence_sum(), self._reference_logps(batch, split),
                             scores.lengths())
        out = self.objective(inputs)
        if not diagnostics:
            return out, {}
        if self.data_kind == "unpaired":
            scores = _first_rows(scores, batch["index"].shape[0])
        return out, token_diagnostics(scores)

    def _token_terms_forward(self, batch: dict[str, torch.Tensor]
                             ) -> tuple[ObjectiveOutput, dict[str, torch.Tensor]]:
        """The objective on the per-token terms it declared (see module doc)."""
        terms = self.objective.token_terms
        k = batch["input_ids"].shape[0] // batch["index"].shape[0]
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        pack = dict(pack=k if self.packs else None, pack_max_tokens=self.pack_max_tokens,
                    packed=batch.get("packed"), index=batch.get("completion_index"))
        reference = None
        if REFERENCE_TERMS & set(terms):
            with torch.no_grad(), self.reference.scope() as model:
                reference = reference_side(model, *args, **pack)
        inputs, diagnostics = completion_terms(self.policy, *args, terms, k=k,
                                               reference=reference, **pack)
        return self.objective(inputs), diagnostics

    def fsdp_roots(self) -> list[torch.nn.Module]:
        return [self.policy]

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim_cfg, fused_on_cpu=True)
