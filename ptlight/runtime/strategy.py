"""Strategies that need the model to be built: FSDP sharding, and where the reference goes.

``trainer=fsdp`` (``conf/trainer/fsdp.yaml``) is torch's FSDP2 (``fully_shard``) driven by
Lightning's ``ModelParallelStrategy``, through :class:`FSDPStrategy`, a subclass that shards
over every process (a 1-D data-parallel mesh) and reads these ``trainer.strategy`` keys:

- ``auto_wrap_policy: decoder_layers`` — one FSDP unit per decoder layer: the classes named in
  the model's ``_no_split_modules`` (``Lfm2DecoderLayer`` for LFM2, ``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``, ... for any transformers causal LM); ``null``: one unit per model.
- ``activation_checkpointing_policy: decoder_layers`` — recompute those layers in the backward
  pass (transformers' non-reentrant gradient checkpointing, which FSDP2 composes with).
- ``sharding_strategy``: ``FULL_SHARD`` (parameters resharded after the forward, gathered again
  for the backward) or ``SHARD_GRAD_OP`` (kept gathered between forward and backward).
- ``state_dict_type``: ``sharded`` (``checkpoints/last.ckpt/`` is a directory of per-rank
  shards, torch.distributed.checkpoint) or ``full`` (one file).
- ``cpu_offload``: keep the sharded parameters, gradients and optimiser state in CPU memory.

Each method's ``configure_model`` calls :func:`shard_method`, which shards what the method
trains (``fsdp_roots``: the policy; ``rm``: the reward model, its score head included; ``ppo``:
the policy and its value head) and its frozen reference, all with the same units and the same
mixed precision: ``trainer.precision=bf16-mixed`` gives every unit — heads too — bf16
parameters for compute and fp32 gradient reduction (``MixedPrecisionPolicy``), with fp32
master weights. Gradient clipping by norm is torch's ``clip_grad_norm_`` over the sharded
gradients (the norm of the whole model). FSDP2 runs on CUDA (NCCL) and on the CPU (gloo), so
the same tests run in CI.

The HF export gathers the full state on rank 0 (:func:`full_module_state`).

Nothing here is distributed code of our own: sharding, mixed precision, checkpoint formats and
process launch are torch's and Lightning's.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf

from ptlight.model.backbone import peft_wrapper
from ptlight.errors import ConfigError

DECODER_LAYERS = "decoder_layers"


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """Classes of ``model``'s submodules named in its ``_no_split_modules`` (the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(
            f"trainer.strategy.auto_wrap_policy={DECODER_LAYERS}: {type(model).__name__} names no "
            f"decoder layer class in _no_split_modules ({sorted(names) or 'empty'}); set "
            "trainer.strategy.auto_wrap_policy to null (one FSDP unit) or use another strategy"
        )
    return found


def _policy(value: Any, model: torch.nn.Module, key: str) -> Any:
    if value is None:
        return None
    if value == DECODER_LAYERS:
        return decoder_layer_classes(model)
    raise ConfigError(f"trainer.strategy.{key}={value!r}; use {DECODER_LAYERS} or null")


SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # -> reshard_after_forward
STATE_DICT_TYPES = ("sharded", "full")


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process is one data-parallel
    shard (a 1-D mesh, no tensor parallelism), and the options of ``trainer=fsdp`` (see the
    module docstring) are kept for :func:`shard_method`, which the methods' ``configure_model``
    calls. ``auto_wrap_policy`` is a set of layer classes here (:func:`build_strategy` resolves
    ``decoder_layers`` for the built policy) or None."""

    def __init__(self, auto_wrap_policy: set[type[torch.nn.Module]] | None = None,
                 activation_checkpointing_policy: Any = None,
                 sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "sharded",
                 cpu_offload: bool = False, **kwargs: Any) -> None:
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f"trainer.strategy.sharding_strategy={sharding_strategy!r}; use "
                              f"one of {sorted(SHARDING_STRATEGIES)}")
        if state_dict_type not in STATE_DICT_TYPES:
            raise ConfigError(f"trainer.strategy.state_dict_type={state_dict_type!r}; use one "
                              f"of {STATE_DICT_TYPES}")
        if not isinstance(cpu_offload, bool):
            raise ConfigError(f"trainer.strategy.cpu_offload={cpu_offload!r}; use true or false")
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.layer_classes = set(auto_wrap_policy or ())
        self.activation_checkpointing = bool(activation_checkpointing_policy)
        self.reshard_after_forward = SHARDING_STRATEGIES[sharding_strategy]
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def fully_shard_kwargs(self) -> dict[str, Any]:
        """``fully_shard`` arguments shared by every unit: the data-parallel mesh, the mixed
        precision of ``trainer.precision`` and the offload policy."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"]}
        if str(getattr(self.precision_plugin, "precision", "")) == "bf16-mixed":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                       reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs


def is_fsdp(strategy_cfg: Any) -> bool:
    """Whether a ``trainer.strategy`` node builds :class:`FSDPStrategy` (or a subclass)."""
    if not isinstance(strategy_cfg, DictConfig) or not strategy_cfg.get("_target_"):
        return False
    from hydra.utils import get_class

    try:
        return issubclass(get_class(strategy_cfg._target_), FSDPStrategy)
    except Exception:  # not importable: let the Trainer report it
        return False


def build_strategy(trainer_cfg: DictConfig,
                   model: torch.nn.Module) -> tuple[DictConfig, dict[str, Any]]:
    """``(trainer config, extra Trainer kwargs)``: for ``trainer=fsdp`` the config without its
    ``strategy`` node plus ``{"strategy": FSDPStrategy(...)}`` with the layer policies resolved
    for ``model``; any other strategy: the config unchanged and ``{}``."""
    spec = trainer_cfg.get("strategy")
    if not is_fsdp(spec):
        return trainer_cfg, {}
    if peft_wrapper(model) is not None:
        raise ConfigError(
            "trainer=fsdp with model.lora.enabled=true is not supported: LoRA trains a few "
            "million weights, which trainer=ddp replicates cheaply; use trainer=ddp"
        )
    kwargs: dict[str, Any] = OmegaConf.to_container(spec, resolve=True)  # type: ignore[assignment]
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        kwargs[key] = _policy(kwargs.get(key), model, key)
    from hydra.utils import get_class

    strategy = get_class(kwargs.pop("_target_"))(**kwargs)  # its ConfigErrors reach the user
    rest = OmegaConf.masked_copy(trainer_cfg, [k for k in trainer_cfg if k != "strategy"])
    return rest, {"strategy": strategy}


def multiprocess(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config runs more than one process (devices x num_nodes > 1)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple, ListConfig)):
        count = len(devices)
    elif str(devices) in ("auto", "-1"):  # every visible GPU; one process on CPU
        count = 1 if trainer_cfg.get("accelerator") == "cpu" else torch.cuda.device_count()
    else:
        count = int(devices)
    return count * int(trainer_cfg.get("num_nodes", 1)) > 1


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_pipeline_launch(trainer_cfg: DictConfig, pipeline: bool = True) -> None:
    """Refuse what Lightning's own launcher cannot do: start ranks once per Trainer.

    From a plain ``python -m ptlight``, Lightning starts ranks 1..N-1 of a DDP/FSDP Trainer by
    re-running the command line. A pipeline (one Trainer per stage) or a Hydra multirun (one
    per job, each rank re-running the whole sweep with its own timestamped dirs) would then be
    run by every rank, not joined by them. Under torchrun/SLURM the ranks exist before Python
    starts and each Trainer joins them; ``ddp_spawn`` starts fresh ranks for every ``fit``.
    """
    spec = trainer_cfg.get("strategy")
    launched_externally = "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not multiprocess(trainer_cfg) or launched_externally or spec == "ddp_spawn":
        return
    if pipeline:
        raise ConfigError(
            "the pipeline (no method=...) runs one stage after another in one process, and "
            "Lightning can launch its DDP/FSDP processes once per command. Run the stages one by "
            "one (python -m ptlight method=sft trainer=ddp, then method=dpo "
            "model.path=<its export> trainer=ddp), or launch with torchrun / srun (docs/scale.md)"
        )
    if _in_multirun():
        raise ConfigError(
            "a multirun (-m) with a multi-process trainer needs a launcher that starts each "
            "job's processes: hydra/launcher=ptlight_slurm (SLURM), or "
            "trainer.strategy=ddp_spawn; Lightning's re-launch of the command would re-run the "
            "whole sweep in every rank (docs/scale.md)"
        )


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` or any of its submodules is an FSDP2 unit (holds DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _shard(root: torch.nn.Module, strategy: FSDPStrategy, trains: bool) -> None:
    """``fully_shard`` each decoder layer of ``root`` (``strategy.layer_classes``), then
    ``root`` itself (its remaining parameters: embeddings, final norm, heads). Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import PreTrainedModel

    if isinstance(root, FSDPModule):
        return
    kwargs = strategy.fully_shard_kwargs()
    if trains and strategy.activation_checkpointing:
        for m in root.modules():
            if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing:
                m.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    reshard = strategy.reshard_after_forward if trains else True
    for m in list(root.modules()):
        if m is not root and type(m) in strategy.layer_classes:
            fully_shard(m, reshard_after_forward=reshard, **kwargs)
    # The root unit stays gathered after its forward: ptlight's LM head runs on the root's
    # weight after the forward (ptlight.engine.packing.base_forward), and the backward needs it next.
    fully_shard(root, reshard_after_forward=False, **kwargs)


def shard_method(module: L.LightningModule) -> None:
    """A method's ``configure_model``: under :class:`FSDPStrategy`, shard every module the
    method runs (``module.fsdp_roots()``, whose forwards are called) and its reference's own
    model when it has one (:meth:`ptlight.model.reference.Reference.shard_with`), with the
    same units and mixed precision. Any other strategy: nothing."""
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, FSDPStrategy):
        return
    roots = list(module.fsdp_roots())
    for root in roots:
        _shard(root, strategy, trains=True)
    reference = getattr(module, "reference", None)
    if reference is not None:
        reference.shard_with(lambda model: _shard(model, strategy, trains=False))


def fsdp_without_rank0_generation(trainer_cfg: DictConfig) -> bool:
    """True (with a warning) under a multi-process FSDP: validation samples are generated on
    rank 0 alone, which a sharded policy cannot do, so they are off; the gold evaluation after
    training runs on the gathered export."""
    if not (is_fsdp(trainer_cfg.get("strategy")) and multiprocess(trainer_cfg)):
        return False
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn("trainer=fsdp: eval.val_samples (rank-0 generation during validation) is "
                   "off; the gold evaluation after training uses the gathered export")
    return True


def full_module_state(trainer: L.Trainer, module: L.LightningModule,
                      ) -> dict[str, torch.Tensor] | None:
    """Under FSDP: the module's full (unsharded) state dict, gathered onto rank 0's CPU; ``{}``
    on other ranks. Every rank must call it. Without FSDP: None (export the modules as they
    are)."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def submodule_state(state: dict[str, torch.Tensor], module: torch.nn.Module,
                    part: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``module``'s state dict ``state`` that belong to its submodule ``part``,
    keyed as ``part.state_dict()`` keys them (the policy is ``policy.`` in most methods and
    ``model.backbone.`` in ``rm``)."""
    name = next(n for n, m in module.named_modules() if m is part)
    prefix = f"{name}." if name else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
