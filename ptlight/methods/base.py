"""The contract between :func:`ptlight.train.train_stage` and a method.

A method is a ``LightningModule`` that subclasses :class:`Method`. ``train_stage`` builds it
with constructed objects only — the policy, the objective, the optimiser settings, the
:class:`~ptlight.model.reference.Reference` and whatever :meth:`Method.extra_args` returns —
and talks to it through the hooks below, never through the config tree of another group.
Every hook has a default that does nothing (or passes the objective's own choice through);
a method overrides the ones it needs. The base holds no training logic: the steps, the
optimiser and the logging are the method's (:mod:`ptlight.methods.common` has the shared
pieces). Register a new method in :data:`ptlight.methods.METHODS`
and point a ``conf/method/*.yaml`` at it with ``module: <name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ptlight.model.reference import Reference
from ptlight.objectives import Objective


class Method(L.LightningModule):
    """Base class of every method. Class attributes:

    - ``data_kinds``: the objective data kinds (``Objective.data_kind``) the method drives;
      ``train_stage`` refuses any other objective before weights load.
    - ``reference_modes``: the ``method.reference`` kinds it can use (``none`` always counts
      for objectives that need no reference).
    - ``generates``: whether the trained policy generates text, so the gold metric (and
      validation samples) apply; a reward model does not (it reports :meth:`evaluate`).
    """

    data_kinds: ClassVar[tuple[str, ...]] = ()
    reference_modes: ClassVar[tuple[str, ...]] = ("none",)
    generates: ClassVar[bool] = True

    def __init__(self, policy: PreTrainedModel, objective: Objective, optim: DictConfig,
                 reference: Reference) -> None:
        super().__init__()
        # a plain attribute, not a registered child: checkpoints never carry the reference
        self.reference = reference

    # ---- before any weights load (class methods: nothing is built yet) ----------------------
    @classmethod
    def data_kind_for(cls, method_cfg: DictConfig, objective: Objective) -> str:
        """The data shape the data module prepares (``rm``: the pairwise or listwise rows a
        ``scores`` objective compares; ``ppo``: prompts). Default: the objective's kind."""
        return objective.data_kind

    @classmethod
    def check_reference(cls, mode: str, objective: Objective) -> None:
        """Raise a :class:`~ptlight.errors.ConfigError` when the method cannot use reference
        kind ``mode`` (a resolved ``method.reference``) with ``objective``."""
        if mode not in cls.reference_modes:
            from ptlight.errors import ConfigError

            usable = [m for m in cls.reference_modes if m != "none"] or ["none"]
            raise ConfigError(f"method.reference={mode} cannot serve method.module="
                              f"{cls.__name__}; use one of: {', '.join(usable)}")

    @classmethod
    def extra_args(cls, cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
        """Constructor arguments beyond the common four, built from the config (``ppo``: the
        reward plugin and its settings). Check settings here: it runs before weights load."""
        return {}

    @classmethod
    def trainer_overrides(cls, cfg: DictConfig) -> dict[str, Any]:
        """``lightning.Trainer`` arguments the method needs set its way (``ppo`` clips inside
        its manual optimisation, so ``gradient_clip_val=None``)."""
        return {}

    # ---- training -------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, reusing the non-finite guard's gradient norm
        (:func:`ptlight.runtime.callbacks.clip_gradients`; bitwise the same result)."""
        from ptlight.runtime.callbacks import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def fsdp_roots(self) -> list[torch.nn.Module]:
        """The modules whose forwards the method calls and that ``trainer=fsdp`` shards
        (:func:`ptlight.runtime.strategy.shard_method`); the reference follows them."""
        return []

    def configure_model(self) -> None:
        """Lightning's hook: under ``trainer=fsdp``, shard :meth:`fsdp_roots` and the
        reference; any other strategy: nothing."""
        from ptlight.runtime.strategy import shard_method

        shard_method(self)

    # ---- after training ---------------------------------------------------------------------
    def export_extras(self, export_dir: Path, state: dict[str, torch.Tensor] | None = None
                      ) -> None:
        """Write what the export needs beside the policy (a score or value head). ``state``:
        the module's full state dict when the modules hold FSDP shards, else None."""

    def unsharded(self, backbone: PreTrainedModel, export_dir: Path) -> Method:
        """This method around a policy reloaded from ``export_dir`` (FSDP: the trained modules
        hold shards, rank 0 evaluates the export). Default: itself."""
        return self

    def evaluate(self, tokenizer: Any, task: Any, eval_cfg: DictConfig) -> dict[str, Any] | None:
        """Held-out metrics of a method that does not generate (``generates = False``),
        reported as ``heldout`` in eval.json; None: nothing beyond the gold metric."""
        return None
