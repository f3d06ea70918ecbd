"""Less activation memory for LFM2's SwiGLU MLP: bitwise the same numbers, no extra matmul.

``Lfm2MLP.forward`` is ``w2(silu(w1(x)) * w3(x))``. Autograd keeps, per layer, ``a = w1(x)``,
``silu(a)``, ``b = w3(x)`` and the product ``silu(a)·b`` (the input of ``w2``): four ``[T, F]``
tensors (F = the MLP width, 4× the hidden size), which on the DPO benchmark were three
quarters of every activation byte the policy's forward saved. :class:`SwiGLUDown` computes
``w2(silu(a)·b)`` as one autograd node that keeps ``a`` and ``b`` only and rebuilds
``silu(a)`` and the product element-wise in the backward (cheap, memory-bound work; the
matmuls run once, as before). Forward and backward are the same ops in the same order as
autograd's, so values and gradients are bitwise the stock layer's.

:func:`install_lean_mlp` applies it to every ``Lfm2MLP`` of a model (the training policy,
from :func:`ptlight.train.train_stage`). An MLP takes the lean path only when all of these
hold, and the stock forward otherwise (same result, more memory):

- ``w1``, ``w2``, ``w3`` are plain bias-free ``nn.Linear`` (LoRA's peft layers are not);
- gradients are being recorded (a ``no_grad`` forward saves nothing in either case).

Under CUDA autocast (``trainer.precision=bf16-mixed``) ``a`` and ``b`` are in autocast's dtype and
the node multiplies them by the weight cast as autocast casts it, with autocast off inside:
the same operands and ops as the stock layer, so again bitwise the same, and two ``[T, F]``
bf16 tensors fewer kept per layer (at the LFM2-1.2B shape, a packed DPO batch of 8 pairs, about
3,400 tokens: 16 layers × 2 × 3,400 × 5,632 × 2 bytes ≈ 1.2 GB).

Bitwise equality matters beyond tidiness: greedy evaluations of a small model amplify
fp32-rounding differences in training into different gold figures, so a layer that is only
"equal within rounding" would change every reproduced result table.

``train_stage`` installs it on single-process and DDP runs, on the CPU and on CUDA, but not
under FSDP, since FSDP manages the unsharded weights that autograd saves and this node should
not second-guess it, and not with ``model.compile`` (the compiled MLP's saved activations are
inductor's to plan, and dynamo cannot trace this node's scratch buffers).
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F

from ptlight.engine.fused_proj import fused_linear


class _Scratch(threading.local):
    """Per-thread flat buffers, grown to the largest request and reused: the temporaries of
    :class:`SwiGLUDown` (``silu(a)``, the product) live only inside one call, so every MLP of
    every step can share them instead of allocating (and, with ``malloc_mmap_threshold`` set,
    page-faulting) fresh ``[T, F]`` tensors each time."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            self.buffers[key] = buf = torch.empty(like.numel(), dtype=like.dtype,
                                                  device=like.device)
        return buf[: like.numel()].view(like.shape)


_scratch = _Scratch()
# Autocast devices the lean node serves. CPU autocast keeps the stock layer: under
# ``cpu_bf16=upcast`` (ptlight.engine.cpu_bf16) its GEMMs are rounded fp32 ones, which this
# node, running with autocast off, would turn back into the native bf16 kernels it avoids.
AUTOCAST_DEVICES = ("cuda",)


class SwiGLUDown(torch.autograd.Function):
    """``F.linear(silu(a) * b, weight)``, saving ``a``, ``b`` (and the weight) only.

    The same element-wise ops as autograd's (``silu``, ``mul``, ``aten.silu_backward``) in
    the same order, written into reused buffers: the results are bitwise the stock layer's."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, weight)
        s = torch.ops.aten.silu.out(a, out=_scratch.get(0, a))
        return F.linear(torch.mul(s, b, out=_scratch.get(1, a)), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, weight = ctx.saved_tensors
        s = torch.ops.aten.silu.out(a, out=_scratch.get(0, a))
        grad_w = None
        if ctx.needs_input_grad[2]:
            p = torch.mul(s, b, out=_scratch.get(1, a))
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ p.reshape(-1, p.shape[-1])
        grad_p = grad @ weight  # d/dp of p @ W^T; becomes grad_b in place below
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.ops.aten.silu_backward(
                torch.mul(grad_p, b, out=_scratch.get(1, a)), a)
        grad_b = grad_p.mul_(s) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, grad_w


def _plain_linear(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear and m.bias is None


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if not (torch.is_grad_enabled() and (not autocast or device in AUTOCAST_DEVICES)
            and _plain_linear(self.w1) and _plain_linear(self.w2) and _plain_linear(self.w3)):
        return type(self).forward(self, x)
    self._ptl_lean_calls += 1
    # w1(x) and w3(x) as one matmul where model.fuse_projections set it (ptlight.engine.fused_proj)
    a, b = (fused_linear((self.w1, self.w3), x) if self.__dict__.get("_ptl_fused_w13")
            else (self.w1(x), self.w3(x)))
    if not autocast:
        return SwiGLUDown.apply(a, b, self.w2.weight)
    # Autocast: w1(x) and w3(x) come out in its dtype, and the stock w2 would multiply them by
    # a cast of its weight. The cast is made here instead (differentiable, as autocast's is, so
    # the weight's gradient comes back in the weight's dtype) and the node runs with autocast
    # off, on the very operands autocast would have given the stock layer.
    weight = self.w2.weight.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return SwiGLUDown.apply(a, b, weight)


def install_lean_mlp(model: torch.nn.Module) -> int:
    """Route every ``Lfm2MLP`` of ``model`` through :class:`SwiGLUDown` when it applies (see
    the module doc); returns how many MLPs were patched (0 for other architectures).
    Idempotent; set on the instances, so other models in the process are untouched."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Lfm2MLP":
            if not getattr(m, "_ptl_lean", False):
                m.forward = types.MethodType(_lean_mlp_forward, m)
                m._ptl_lean, m._ptl_lean_calls = True, 0
            n += 1
    return n
