"""The reference model a method measures its policy against, behind one interface.

``method.reference`` picks the kind; :func:`reference_mode` checks it against the objective
and the model config before any weights load, and :func:`build_reference` makes it once the
policy exists:

- :class:`NoReference` (``none``, or an objective that needs none): reference-free objectives
  (SimPO, ORPO, SFT, the reward model).
- :class:`FrozenCopy` (``copy``): a frozen deep copy of the starting policy in eval mode. Under
  ``trainer=fsdp`` it is sharded like the policy (:meth:`Reference.shard_with`).
- :class:`AdapterReference` (``adapter``, and ``copy`` with LoRA): the LoRA policy itself with
  its adapters disabled, or with its frozen starting adapter active; no second copy of any
  weight.
- :class:`Precomputed` (``precompute``): another reference (or, in a fresh run, the policy
  itself before its first step) scores every train/val example once before training; the
  method then looks the values up by example index and the scorer is released.

A method holds its reference as a plain attribute (not an ``nn.Module`` child), so checkpoints
never carry the frozen weights. It scores with ``with torch.no_grad(), ref.scope() as model:``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from ptlight.errors import ConfigError
from ptlight.model import backbone
from ptlight.model.backbone import (REFERENCE_ADAPTER, TRAINED_ADAPTER, eval_mode,
                                    lora_settings, peft_wrapper)
from ptlight.objectives.tokens import REFERENCE_TERMS

REFERENCE_MODES = ("copy", "adapter", "precompute", "none")


def auto_reference(objective: Any, modes: tuple[str, ...], cuda: bool, one_process: bool,
                   covers_an_epoch: bool) -> str:
    """``method.reference=auto``: ``precompute`` on one CUDA GPU for a run whose steps reach
    every train row, where it can serve the objective (the method offers it; paired or
    listwise data; no per-token reference terms); else ``copy`` (the adapter reference under
    LoRA).

    Precomputed, the step runs no reference forward and the reference's weights are freed: on
    an H200 at the LFM2-350M shape it was 1.3x the live copy's pairs/s (docs/performance.md).
    It scores the whole train split before the first step, so it is chosen only where the run
    uses every row anyway. Under several processes (DDP, FSDP) and on the CPU, where it was
    not the measured default, ``auto`` keeps the copy.
    """
    live = REFERENCE_TERMS & set(getattr(objective, "token_terms", ()))
    if (cuda and one_process and covers_an_epoch and "precompute" in modes and not live
            and getattr(objective, "data_kind", None) != "unpaired"):
        return "precompute"
    return "copy"


class Reference:
    """Base class. ``mode`` is the ``method.reference`` value the run resolved to."""

    mode: ClassVar[str] = ""

    @property
    def exists(self) -> bool:
        """False for :class:`NoReference` only."""
        return True

    @property
    def precomputed(self) -> bool:
        """True when the method reads stored log-probs instead of running a model."""
        return False

    def scope(self) -> Any:
        """Context manager yielding the model that scores the reference, in eval mode."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Reference:
        """Move a separate reference model next to the policy (no-op where there is none)."""
        return self

    def separate_model(self) -> torch.nn.Module | None:
        """The reference's own module when it is not the policy (what FSDP shards beside it)."""
        return None

    def shard_with(self, shard: Any) -> None:
        """Under FSDP: ``shard(module)`` the separate model, if any (see
        :func:`ptlight.runtime.strategy.shard_method`)."""
        model = self.separate_model()
        if model is not None:
            shard(model)
            model.eval()

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Named tensors the reference's outputs depend on (the precompute cache key)."""
        return iter(())


class NoReference(Reference):
    mode = "none"

    @property
    def exists(self) -> bool:
        return False

    def scope(self) -> Any:
        raise RuntimeError("this run has no reference model (method.reference=none)")


class FrozenCopy(Reference):
    """A frozen deep copy of the starting policy (``requires_grad=False``, eval mode)."""

    mode = "copy"

    def __init__(self, policy: PreTrainedModel) -> None:
        self.model = backbone.frozen_copy(policy)

    def scope(self) -> Any:
        return eval_mode(self.model)

    def to(self, device: torch.device | str) -> Reference:
        self.model.to(device)  # type: ignore[arg-type]  # transformers types .to() narrowly
        return self

    def separate_model(self) -> torch.nn.Module | None:
        return self.model

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.model.state_dict().items())

    def release(self) -> None:
        """Drop the weights' storage (the object may still be referenced elsewhere)."""
        from ptlight.runtime.strategy import is_sharded

        if is_sharded(self.model):  # FSDP shards are freed with the module
            return
        for t in [*self.model.parameters(), *self.model.buffers()]:
            t.data = t.data.new_empty(0)


class AdapterReference(Reference):
    """The reference of a LoRA policy, with no second copy of any weight.

    :meth:`scope` yields the policy in eval mode with its adapters disabled (the base model),
    or, when the policy was loaded from an adapter, with the frozen "reference" adapter active
    (the starting adapter). Use it under ``torch.no_grad()``.
    """

    mode = "adapter"

    def __init__(self, policy: PreTrainedModel) -> None:
        peft_model = peft_wrapper(policy)
        if peft_model is None:
            raise ValueError("AdapterReference needs a policy built with model.lora.enabled=true")
        self.policy, self.peft_model = policy, peft_model

    @contextmanager
    def scope(self) -> Iterator[PreTrainedModel]:
        with eval_mode(self.policy):
            if REFERENCE_ADAPTER in self.peft_model.peft_config:
                # set_adapter also flips requires_grad (active: True, others: False); harmless
                # under no_grad, and undone before the backward pass (as TRL's ref_adapter_name)
                self.peft_model.set_adapter(REFERENCE_ADAPTER)
                try:
                    yield self.policy
                finally:  # "default" active and trainable again, "reference" frozen
                    self.peft_model.set_adapter(TRAINED_ADAPTER)
            else:
                with self.peft_model.disable_adapter():
                    yield self.policy

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        # the trained adapter is not part of the reference
        return ((n, t) for n, t in self.policy.state_dict().items()
                if f".{TRAINED_ADAPTER}." not in n)


class PolicyAtStart(Reference):
    """The policy itself, as the reference of a fresh run before its first optimiser step
    (what :class:`Precomputed` scores with when nothing has trained yet)."""

    mode = "policy"

    def __init__(self, policy: PreTrainedModel) -> None:
        self.policy = policy

    def scope(self) -> Any:
        return eval_mode(self.policy)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.policy.state_dict().items())


class Precomputed(Reference):
    """Reference log-probs computed once before training by ``scorer`` and looked up after.

    The method fills :attr:`values` (split -> ``[N, K]`` per-example sums) at fit start, then
    calls :meth:`release`, which drops the scorer (and a frozen copy's weights).
    """

    mode = "precompute"

    def __init__(self, scorer: Reference) -> None:
        self.scorer: Reference | None = scorer
        self.values: dict[str, torch.Tensor] = {}

    @property
    def precomputed(self) -> bool:
        return True

    def scope(self) -> Any:
        if self.scorer is None:
            raise RuntimeError("the precomputed reference has released its scorer")
        return self.scorer.scope()

    def to(self, device: torch.device | str) -> Reference:
        if self.scorer is not None:
            self.scorer.to(device)
        self.values = {s: v.to(device) for s, v in self.values.items()}
        return self

    def separate_model(self) -> torch.nn.Module | None:
        return None if self.scorer is None else self.scorer.separate_model()

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(()) if self.scorer is None else self.scorer.weights()

    @property
    def scorer_kind(self) -> str:
        """The scorer's model class, or ``AdapterReference`` (part of the cache key)."""
        scorer = self.scorer
        if isinstance(scorer, FrozenCopy):
            return type(scorer.model).__name__
        if isinstance(scorer, PolicyAtStart):
            return type(scorer.policy).__name__
        return type(scorer).__name__

    def lookup(self, split: str, index: torch.Tensor) -> torch.Tensor:
        """``[B·K]`` reference sums of a batch's rows (block k = completion k)."""
        return self.values[split][index].T.reshape(-1)

    def release(self) -> None:
        if isinstance(self.scorer, FrozenCopy):
            self.scorer.release()
        self.scorer = None


def reference_mode(method_cfg: Any, model_cfg: Any, objective: Any) -> str:
    """The reference kind a run uses, checked before any weights load.

    ``none`` when the objective needs no reference; ``adapter`` for ``copy`` with LoRA (no
    second copy of the weights); otherwise ``method.reference`` itself, after checking it.
    """
    mode = method_cfg.get("reference", "none")
    if mode == "auto":  # unresolved (a run resolves it first: ptlight.runtime.devices)
        mode = "copy"
    if mode not in REFERENCE_MODES:
        raise ConfigError(f"method.reference={mode!r}; use auto or one of {REFERENCE_MODES}")
    live = sorted(REFERENCE_TERMS & set(getattr(objective, "token_terms", ())))
    if live and mode in ("none", "precompute"):
        why = ("has no reference model" if mode == "none" else
               "stores only each sequence's summed log-probs")
        raise ConfigError(
            f"objective {objective.name!r} needs the reference's per-token terms {live} "
            f"(full-vocabulary distributions at every completion position), but "
            f"method.reference={mode} {why}; use method.reference=copy (a frozen copy; "
            "with LoRA it becomes the adapter reference, no second copy)")
    if objective.needs_reference and mode == "none":
        raise ConfigError(f"objective {objective.name!r} needs a reference model but "
                          "method.reference=none; use method.reference=copy or precompute")
    lora = lora_settings(model_cfg) is not None
    if mode == "adapter" and not lora:
        raise ConfigError("method.reference=adapter needs LoRA (model.lora.enabled=true); "
                          "without adapters use method.reference=copy or precompute")
    if not objective.needs_reference:
        return "none"
    return "adapter" if lora and mode == "copy" else mode


def build_reference(mode: str, policy: PreTrainedModel, *, keep_copy: bool) -> Reference:
    """The :class:`Reference` of kind ``mode`` for ``policy`` (just built, untrained).

    ``precompute`` scores with the adapter reference under LoRA; otherwise with the policy
    itself, unless ``keep_copy`` (a resumed run, whose policy gets trained weights before the
    precompute, or FSDP, where the policy is sharded for training), which scores with a frozen
    copy of the starting weights.
    """
    if mode == "none":
        return NoReference()
    lora = peft_wrapper(policy) is not None
    if mode == "precompute":
        if lora:
            return Precomputed(AdapterReference(policy))
        return Precomputed(FrozenCopy(policy) if keep_copy else PolicyAtStart(policy))
    if lora:
        return AdapterReference(policy)
    return FrozenCopy(policy)
