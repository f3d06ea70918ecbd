"""Where a run trains, settled before any weights load.

``trainer.accelerator: auto`` (the default) is a CUDA GPU when one is visible, else the CPU;
``trainer.precision: auto`` is ``bf16-mixed`` on a CUDA GPU with bf16 support (Ampere and
newer), else ``32-true``. What the user sets is kept, and checked against the machine: a GPU
asked for where none is visible, more GPUs than are visible, bf16 on a GPU without it, or a
precision Lightning does not know is a :class:`~ptlight.errors.ConfigError` naming the key.
The resolved values are what ``config.yaml`` records.

A few more keys default to ``auto``, resolved from the same machine check (and, for the
reference and packing, the run's length against its data) by :func:`device_defaults` and
:func:`data_defaults`: what measured fastest on a CUDA GPU, the CPU's settings on the CPU
(docs/performance.md has the figures): ``data.num_workers``, ``model.fused_norm``,
``model.fuse_projections``, the
preference methods' ``method.reference``, ``method.pack`` and ``method.pack_multiple_of``, and
the RL methods' ``method.rollout.pack`` and ``method.ppo.pack``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ptlight.errors import ConfigError
from ptlight.runtime.strategy import is_fsdp

GPU_ACCELERATORS = ("gpu", "cuda")
# lightning.Trainer(precision=...) values (the int/short forms are Lightning's aliases)
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true",
              "transformer-engine", "transformer-engine-float16", "32", "16", "64", "bf16")
BF16 = ("bf16-mixed", "bf16-true", "bf16")
# auto on a CUDA GPU (the CPU: 0 workers, widths not rounded); measured with scripts/bench_gpu.py
CUDA_NUM_WORKERS = 2       # collate and pack in worker processes, off the kernel-launching thread
CUDA_PACK_MULTIPLE_OF = 128  # packed widths repeat a few shapes: kernels and plans are reused


def configure_cuda(cudnn_attention: bool) -> None:
    """Process-wide CUDA settings of a run that trains on a GPU: whether SDPA may use cuDNN's
    attention kernel (root key ``cudnn_attention``). cuDNN builds an execution plan per new
    sequence length, and a training run's batches change length at nearly every step."""
    if not isinstance(cudnn_attention, bool):
        raise ConfigError(f"cudnn_attention={cudnn_attention!r}; use true or false")
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


def uses_cuda(trainer_cfg: DictConfig) -> bool:
    """Whether the (resolved or unresolved) trainer config trains on CUDA GPUs."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "auto":
        return torch.cuda.is_available()
    return accelerator in GPU_ACCELERATORS


def _device_count(devices) -> int | None:
    """How many GPUs ``trainer.devices`` asks for (None: every visible one)."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices)
    if text in ("auto", "-1"):
        return None
    try:
        if "," in text:  # Lightning's "0,1" form: a list of indices
            return len([int(d) for d in text.split(",") if d.strip()])
        return int(text)
    except ValueError:
        raise ConfigError(f"trainer.devices={devices!r}; use a number, a list of GPU indices, "
                          "or auto") from None


def resolve_trainer(trainer_cfg: DictConfig) -> DictConfig:
    """``trainer_cfg`` with ``accelerator`` and ``precision`` resolved (see the module doc)."""
    cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=False))
    accelerator = str(cfg.get("accelerator", "auto"))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in GPU_ACCELERATORS and not visible:
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible to "
                          "torch; use trainer.accelerator=auto (the CPU here) or cpu")
    cuda = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and visible > 0)
    if accelerator == "auto":
        cfg.accelerator = "gpu" if cuda else "cpu"
    wanted = _device_count(cfg.get("devices", 1))
    if cuda and wanted is not None and wanted > visible:
        raise ConfigError(f"trainer.devices={cfg.devices} but {visible} CUDA GPU(s) are "
                          f"visible; use trainer.devices={visible} or fewer (or auto: all)")
    precision = str(cfg.get("precision", "auto"))
    if precision == "auto":
        precision = "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"
    elif precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}; use auto, 32-true, bf16-mixed, "
                          "16-mixed, bf16-true or 16-true")
    if cuda and precision in BF16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={precision}: this GPU "
                          f"({torch.cuda.get_device_name()}) has no bf16 support; use "
                          "trainer.precision=16-mixed or 32-true")
    cfg.precision = precision
    return cfg


def single_process(trainer_cfg: DictConfig) -> bool:
    """Whether the (resolved) trainer config runs one process: one device, one node, no
    strategy."""
    return (not trainer_cfg.get("strategy") and _device_count(trainer_cfg.get("devices", 1)) == 1
            and int(trainer_cfg.get("num_nodes", 1) or 1) == 1)


def auto_pack_multiple_of(cuda: bool) -> int:
    """``method.pack_multiple_of=auto``: :data:`CUDA_PACK_MULTIPLE_OF` on CUDA, 1 on the CPU
    (compute there grows with every padded token)."""
    return CUDA_PACK_MULTIPLE_OF if cuda else 1


def device_defaults(cfg: DictConfig, cuda: bool) -> dict:
    """The values of the ``auto`` keys that depend on the machine alone, as a config to merge
    (``method.pack_multiple_of``: :func:`auto_pack_multiple_of`; ``model.fused_norm``: on
    where the run trains on CUDA, :mod:`ptlight.engine.norms`; ``model.fuse_projections``: off
    unless the run trains on CUDA without FSDP or ``model.compile``, where the model's width
    settles it once it loads, :func:`ptlight.engine.fused_proj.auto_fuses`; the RL methods'
    ``method.rollout.pack`` / ``method.ppo.pack``: on the CPU, where it was measured, off on
    CUDA, where it was not)."""
    out: dict = {}
    method: dict = {}
    if cfg.method.get("pack_multiple_of") == "auto":
        method["pack_multiple_of"] = auto_pack_multiple_of(cuda)
    for section in ("rollout", "ppo"):  # the RL methods' packed scoring: measured on the CPU
        settings = cfg.method.get(section)
        if isinstance(settings, DictConfig) and settings.get("pack") == "auto":
            method[section] = {"pack": not cuda}
    if method:
        out["method"] = method
    model: dict = {}
    if cfg.model.get("fused_norm") == "auto":
        model["fused_norm"] = cuda
    if cfg.model.get("fuse_projections") == "auto" and not (
            cuda and not cfg.model.get("compile") and not is_fsdp(cfg.trainer.get("strategy"))):
        model["fuse_projections"] = False  # else settled by the model's width once it loads
    if model:
        out["model"] = model
    return out


def covers_an_epoch(trainer_cfg: DictConfig, batch_size: int, train_rows: int) -> bool:
    """Whether a one-process run's steps reach every train row at least once (a run bounded
    by epochs, ``trainer.max_steps=-1``, does)."""
    steps = int(trainer_cfg.get("max_steps", -1))
    if steps < 0:
        return True
    return steps * batch_size * int(trainer_cfg.get("accumulate_grad_batches", 1) or 1) \
        >= train_rows


def data_defaults(cfg: DictConfig, cuda: bool, reference: str) -> dict:
    """The values of the ``auto`` keys that depend on the data too, as a config to merge:

    - ``method.reference``: ``reference``, settled by the caller from the objective and the
      run (:func:`ptlight.model.reference.auto_reference`);
    - ``method.pack``: on the CPU, on; on CUDA, on with a precomputed reference in one process
      (measured 1.46x the padded step on an H200, docs/performance.md), else off (the padded
      step was the faster with a live reference there);
    - ``data.num_workers``: :data:`CUDA_NUM_WORKERS` where a CUDA step packs (the layouts are
      built off the thread that launches the kernels; measured so), else 0 (the CPU's cores
      train; the padded GPU step was measured in the main process).
    """
    out: dict = {}
    method: dict = {}
    if cfg.method.get("reference") == "auto":
        method["reference"] = reference
    packs = cfg.method.get("pack", False)
    if packs == "auto":
        mode = method.get("reference", cfg.method.get("reference"))
        packs = method["pack"] = not cuda or (mode == "precompute" and single_process(cfg.trainer))
    if method:
        out["method"] = method
    if cfg.data.get("num_workers") == "auto":
        out["data"] = {"num_workers": CUDA_NUM_WORKERS if cuda and packs is True else 0}
    return out
