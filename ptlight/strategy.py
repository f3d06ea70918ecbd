"""Strategies that need the model to be built: FSDP wrapping, and where the reference goes.

``trainer=fsdp`` (``conf/trainer/fsdp.yaml``) is Lightning's ``FSDPStrategy`` with two values
that only exist once the policy is built, resolved here by name:

- ``auto_wrap_policy: decoder_layers`` — one FSDP unit per decoder layer: the classes named in
  the model's ``_no_split_modules`` (``Lfm2DecoderLayer`` for LFM2, ``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``, ... for any transformers causal LM), found among its submodules.
- ``activation_checkpointing_policy: decoder_layers`` — recompute those layers in the backward
  pass (less activation memory, ~30 % more compute); ``null`` turns it off.

Mixed precision is ``trainer.precision`` (``bf16-mixed``: bf16 compute and gradient
reduction, fp32 master weights); ``state_dict_type: sharded`` writes each checkpoint as a
directory of per-rank shards (``checkpoints/last.ckpt/``) that ``ckpt_path=last`` resumes;
the HF export gathers the full state on rank 0 (:func:`full_state_for_export`).

The frozen reference of preference methods is not a child of the LightningModule (checkpoints
do not carry it), so FSDP would not see it and every GPU would hold a full copy.
:class:`ShardReference` wraps it in its own FSDP instance with the same per-layer policy and
mixed precision at fit start: sharded like the policy, gathered layer by layer in its no-grad
forward. Under DDP the reference is replicated like the policy (that is what DDP is).

Nothing here is distributed code of our own: wrapping, sharding and checkpoint formats are
torch's and Lightning's.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ptlight.backbone import peft_wrapper
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


def is_fsdp(strategy_cfg: Any) -> bool:
    """Whether a ``trainer.strategy`` node builds Lightning's ``FSDPStrategy`` (or a subclass)."""
    if not isinstance(strategy_cfg, DictConfig) or not strategy_cfg.get("_target_"):
        return False
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy

    try:
        return issubclass(get_class(strategy_cfg._target_), FSDPStrategy)
    except Exception:  # not importable: let the Trainer report it
        return False


def build_strategy(trainer_cfg: DictConfig,
                   model: torch.nn.Module) -> tuple[DictConfig, dict[str, Any]]:
    """``(trainer config, extra Trainer kwargs)``: for ``trainer=fsdp`` the config without its
    ``strategy`` node plus ``{"strategy": FSDPStrategy(...)}`` with the policies resolved for
    ``model``; any other strategy: the config unchanged and ``{}``."""
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
    strategy = instantiate({"_target_": kwargs.pop("_target_")}, **kwargs)
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
            "model.path=<its export> trainer=ddp), or launch with torchrun / srun (README: Scale)"
        )
    if _in_multirun():
        raise ConfigError(
            "a multirun (-m) with a multi-process trainer needs a launcher that starts each "
            "job's processes: hydra/launcher=ptlight_slurm (SLURM), or "
            "trainer.strategy=ddp_spawn; Lightning's re-launch of the command would re-run the "
            "whole sweep in every rank (README: Scale)"
        )


class ShardReference(L.Callback):
    """Wrap a preference method's frozen reference in FSDP (same layer policy and mixed
    precision as the policy) at fit start, so each GPU holds a shard of it, not a copy."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        holder = getattr(pl_module, "_reference", None)
        strategy = trainer.strategy
        if not isinstance(strategy, FSDPStrategy) or not holder or not isinstance(
                holder[0], torch.nn.Module):
            return  # no reference, or the LoRA adapter reference (no second copy at all)
        reference = holder[0]
        precision = strategy.precision_plugin
        mixed = precision.mixed_precision_config if hasattr(
            precision, "mixed_precision_config") else None
        holder[0] = FullyShardedDataParallel(
            reference,
            auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(reference)),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            mixed_precision=mixed,
            device_id=strategy.root_device.index,
            use_orig_params=True,
        )
        holder[0].eval()


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


def full_policy_state(trainer: L.Trainer, module: L.LightningModule,
                      ) -> dict[str, torch.Tensor] | None:
    """Under FSDP: the policy's full (unsharded) state dict, gathered onto rank 0 (CPU), keys as
    ``policy.state_dict()`` has them; ``{}`` on other ranks. Every rank must call it. Without
    FSDP: None (export the policy as it is)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, config):
        state = trainer.strategy.model.state_dict()
    prefix = "policy."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
