"""bf16 autocast on CPUs without bf16 matrix units: the same rounding, fp32 GEMM kernels.

A bf16 GEMM as ``torch.autocast("cpu", torch.bfloat16)`` defines it rounds its operands to
bf16, accumulates the products in fp32 and rounds the output to bf16. The product of two bf16
numbers is exact in fp32, so rounding the operands to bf16, upcasting them and running the fp32
kernel gives the same result up to the order of the fp32 summation. On CPUs without
AVX512-BF16 or AMX torch's bf16 kernels can be 5-100x slower than its fp32 ones
(``scripts/bench_precision.py`` measures both on the machine at hand), so that detour is the
fast way to get bf16-mixed numerics there.

:class:`UpcastBf16` is a ``TorchFunctionMode``: torch functions reach it before the
dispatcher (and so before autocast's casts), and while CPU autocast in bf16 is on it runs the
ops autocast would run in bf16 (:data:`UPCAST_OPS`: linear, matmul/``@``, mm, bmm, addmm,
baddbmm, addbmm, conv1d-3d, scaled_dot_product_attention) as

    floating inputs .to(bfloat16).to(float32) -> the op in fp32, autocast off -> .to(bfloat16)

The casts are ordinary autograd ops, so gradients are rounded to bf16 at the same points as
under native autocast, and the backward runs fp32 GEMMs too (most of the gain). Differences
from native autocast, all within bf16 rounding:

- fp32 summation order differs (different kernels);
- the native CPU flash-attention kernel rounds the softmax probabilities to bf16 before
  ``P @ V``; the fp32 kernel keeps them in fp32 (closer to fp32, not further).

``F.linear`` (nearly every FLOP of an LLM) is one autograd node that saves its operands in
bf16, as native autocast does, and upcasts them again in the backward; the other ops save the
fp32 upcasts of their inputs (bf16 values, twice the bytes; attention and convolutions only).

Left alone (native behaviour): calls with non-floating or fp64 inputs, tensors off the CPU,
``out=`` calls, and composites that reach a GEMM from C++ (``einsum``, ``tensordot``: their
inner ``bmm`` never passes through Python). Nothing is cached: weights are rounded on every
call, as under Lightning's autocast (``cache_enabled=False``); rounding all of lfm2-tiny's
weights takes ~2 ms of a ~450 ms training step, and each is used once per forward.

Lightning runs every forward under ``precision_plugin.forward_context()`` (training,
validation, ptlight's reference precompute, PPO rollouts inside ``training_step``);
:class:`UpcastBf16Precision` adds the mode there. Gradient checkpointing recomputes forwards
inside the backward, outside that context (torch function modes do not reach the autograd
engine; checkpoint re-enters only the autocast it recorded): reentrant checkpointing then
recomputes with the native kernels (correct within bf16 rounding, only slower), and
non-reentrant checkpointing (transformers' default) refuses the recomputed bf16 tensors where
the forward saved fp32 ones, unless given ``context_fn=``:func:`checkpoint_contexts`.

``cpu_bf16`` (root config) picks it: ``upcast``, ``native`` (torch's bf16 kernels), or
``auto``: ``native`` when the CPU has native bf16 matmul (:func:`has_native_bf16_matmul`),
``upcast`` otherwise. It only matters for ``trainer.precision=bf16-mixed`` on the CPU;
``32-true`` never enters the mode.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from omegaconf import DictConfig, OmegaConf
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ptlight.errors import ConfigError

log = logging.getLogger(__name__)

CPU_BF16_MODES = ("auto", "upcast", "native")
BF16_PRECISIONS = ("bf16-mixed", "bf16")  # Lightning reads "bf16" as "bf16-mixed"

# The ops CPU autocast runs in bf16 that LFM2 and ptlight reach from Python (functions and the
# Tensor methods that are the same op).
UPCAST_OPS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
    torch.addbmm, torch.Tensor.addbmm,
})
_ROUNDED = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts to bf16


def _eligible(tensors: list[torch.Tensor]) -> bool:
    """Every tensor on the CPU and strided, the floating ones castable, at least one of them."""
    floating = [t for t in tensors if t.is_floating_point()]
    return (bool(floating) and all(t.device.type == "cpu" and t.layout == torch.strided
                                   for t in tensors)
            and all(t.dtype in _ROUNDED for t in floating))


def _round(x: Any) -> Any:
    """A floating tensor rounded to bf16 and held in fp32 (autograd flows through both casts)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.bfloat16).to(torch.float32)
    return x


class _UpcastLinear(torch.autograd.Function):
    """``F.linear`` on bf16 operands computed by the fp32 kernel, output rounded to bf16.

    Saves its operands in bf16 (what native autocast saves), not their fp32 upcasts: a
    rerouted linear through the generic path would keep an fp32 copy of every weight and
    activation it consumed until the backward, twice native autocast's bytes. The backward
    upcasts them again and runs fp32 GEMMs; the gradients are rounded to bf16, as native
    autocast's are, before the casts' own backward takes them to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.float()
        grad_x = (g @ weight.float()).to(torch.bfloat16) if ctx.needs_input_grad[0] else None
        rows = g.reshape(-1, g.shape[-1])  # [N, out]
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (rows.T @ x.float().reshape(-1, x.shape[-1])).to(torch.bfloat16)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(torch.bfloat16)
        return grad_x, grad_w, grad_b


def _upcast_linear(x, weight, bias=None):
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731  autograd flows through the cast
    return _UpcastLinear.apply(bf16(x), bf16(weight), None if bias is None else bf16(bias))


class UpcastBf16(TorchFunctionMode):
    """While CPU autocast is on in bf16, run :data:`UPCAST_OPS` as rounded fp32 (see module).

    ``rerouted`` counts the calls it ran that way. The ops take their tensors as top-level
    arguments, so no nested structures are searched (this runs on every torch call).
    """

    def __init__(self) -> None:
        super().__init__()
        self.rerouted = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func not in UPCAST_OPS or "out" in kwargs
                or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16):
            return func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not _eligible(tensors):
            return func(*args, **kwargs)
        linear = func is F.linear
        if not linear:
            args = tuple(_round(a) for a in args)
            kwargs = {k: _round(v) for k, v in kwargs.items()}
        torch.set_autocast_enabled("cpu", False)  # cheaper than a torch.autocast(...) block
        try:
            out = _upcast_linear(*args, **kwargs) if linear else func(*args, **kwargs)
        finally:
            torch.set_autocast_enabled("cpu", True)
        self.rerouted += 1
        return out if linear else out.to(torch.bfloat16)  # UPCAST_OPS return one tensor


class UpcastBf16Precision(MixedPrecision):
    """Lightning's ``bf16-mixed`` on the CPU with :class:`UpcastBf16` inside the autocast of
    every forward (``forward_context``; training, validation, test and predict steps use it)."""

    def __init__(self) -> None:
        super().__init__("bf16-mixed", "cpu")

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        with self.autocast_context_manager(), UpcastBf16():
            yield


def checkpoint_contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: recompute under
    :class:`UpcastBf16` exactly when the forward ran under it (called at forward time).

    The backward, and so the recomputation, runs without the forward's torch function modes;
    checkpoint re-enters only the autocast it recorded. Without this a recomputation under
    ``cpu_bf16=upcast`` saves bf16 tensors where the forward saved fp32 ones, which the
    non-reentrant checkpoint refuses (``CheckpointError``); the reentrant one recomputes with
    the native kernels (correct within bf16 rounding, slower). With transformers:
    ``model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant":
    False, "context_fn": checkpoint_contexts})`` (transformers 5).
    """
    active = any(isinstance(m, UpcastBf16) for m in _get_current_function_mode_stack())
    return nullcontext(), UpcastBf16() if active else nullcontext()


def _cpuinfo_flags() -> set[str] | None:
    """The words of ``/proc/cpuinfo`` (its ``flags``/``Features`` lines), None if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return None


def has_native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16 or AMX on x86
    (torch's own probes), else the ``avx512_bf16``/``amx_bf16``/``bf16`` (ARM) flags of
    ``/proc/cpuinfo``. Unknown: True (keep torch's kernels)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        probes = [getattr(torch.cpu, n, None)
                  for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(callable(p) for p in probes):
            return any(p() for p in probes)
    flags = _cpuinfo_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_mode(mode: str) -> str:
    """``cpu_bf16`` -> ``"upcast"`` or ``"native"``; a ConfigError for anything else."""
    if mode not in CPU_BF16_MODES:
        raise ConfigError(f"cpu_bf16={mode!r}; use one of {', '.join(CPU_BF16_MODES)}")
    if mode == "auto":
        return "native" if has_native_bf16_matmul() else "upcast"
    return mode


def _on_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"


def precision_plugins(trainer_cfg: DictConfig, mode: str) -> tuple[DictConfig, list[Precision]]:
    """``(trainer config, precision plugins)`` for the Trainer.

    ``trainer.precision=bf16-mixed`` on the CPU with ``cpu_bf16`` resolving to ``upcast``: the
    config without ``precision`` (Lightning refuses both) and ``[UpcastBf16Precision()]``;
    otherwise the config unchanged and ``[]``. ``mode`` is checked in every case.
    """
    resolved = resolve_mode(mode)
    if (resolved != "upcast" or str(trainer_cfg.get("precision")) not in BF16_PRECISIONS
            or not _on_cpu(trainer_cfg)):
        return trainer_cfg, []
    log.info("cpu_bf16=%s: bf16-mixed runs its GEMMs as bf16-rounded fp32 (ptlight.engine.cpu_bf16)",
             mode)
    rest = OmegaConf.masked_copy(trainer_cfg, [k for k in trainer_cfg if k != "precision"])
    return rest, [UpcastBf16Precision()]
