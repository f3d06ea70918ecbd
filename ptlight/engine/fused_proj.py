"""``model.fuse_projections``: sibling projections of one input as one matmul while training.

LFM2's attention projects its input three times (``q_proj``, ``k_proj``, ``v_proj``) and its
SwiGLU MLP twice (``w1``, ``w3``). Eagerly each projection is a matmul forward and two backward,
under ``bf16-mixed`` a cast of its input and of its weight each way, and the input's gradient
is summed over the siblings. :func:`fused_linear` concatenates the siblings' weights, multiplies
once and splits the result, so a step launches one matmul (one cast of the input, one of the
weights) per group instead of one per sibling; its backward is one matmul for the input's
gradient and one for the weights'. On a GPU whose eager step waits on the host that dispatches
it (the 350M DPO step on an H200), each op not dispatched is step time: 1.36x the step there.
Where the kernels already fill the step (the 1.2B one) the concatenations and the split
products' strided element-wise work are time the GPU adds, 5% there; hence the ``auto``
setting's width limit (:data:`AUTO_MAX_HIDDEN_SIZE`).

:func:`install_fused_projections` routes, on every LFM2 decoder layer whose projections are
plain bias-free ``nn.Linear``:

- the attention's q/k/v projections: whichever is called first computes all three and hands
  each sibling its part for the same input tensor (the attention's own forward is untouched);
- the MLP's ``w1``/``w3``, inside the lean MLP (:mod:`ptlight.engine.lean`).

Only while gradients are recorded: a call without them (scoring a reference, generation) runs
the stock projections, since concatenating the weights on every decoding step would cost more
than it saves.

The same function, not bitwise the same numbers: the concatenated product may reduce in another
order, and under autocast the input's gradient is summed inside one bf16 matmul instead of as
three bf16 gradients cast to fp32 and added. Equal within floating-point tolerance
(``tests/test_fused_proj.py``).
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_OUT = "_ptl_fused_out"  # a sibling's stashed part: (the input it was computed for, the part)

# ``model.fuse_projections=auto`` fuses on CUDA for models at most this wide. On an H200
# (bench_results/h200-2026-11-27d) fusing made the LFM2-350M DPO step (hidden 1024, 16 pairs),
# whose GPU waited on the host, 1.36x faster (73.8 against 100.2 ms), and the LFM2-1.2B step
# (hidden 2048, 8 pairs), whose kernels already filled it, 5% slower (89.6 against 85.3 ms):
# the concatenated weights and the split products' strided element-wise work cost the GPU
# about 4 ms there.
AUTO_MAX_HIDDEN_SIZE = 1024


def fused_linear(linears: Sequence[torch.nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in linears)`` as one matmul on the concatenated weights (bias-free)."""
    weight = torch.cat([m.weight for m in linears])
    return F.linear(x, weight).split([m.out_features for m in linears], dim=-1)


def fusable(linears: Sequence[torch.nn.Module]) -> bool:
    """Plain bias-free ``nn.Linear`` s of one input width and one weight dtype (not peft's
    LoRA layers, not quantized ones)."""
    return (all(type(m) is torch.nn.Linear and m.bias is None for m in linears)
            and len({m.in_features for m in linears}) == 1
            and len({m.weight.dtype for m in linears}) == 1)


def _sibling_forward(self, x: torch.Tensor) -> torch.Tensor:
    stashed = self.__dict__.pop(_OUT, None)
    if stashed is not None and stashed[0] is x:
        return stashed[1]
    if not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    group = self._ptl_siblings  # fusable, checked when installed
    parts = fused_linear(group, x)
    mine = None
    for m, part in zip(group, parts):
        if m is self:
            mine = part
        else:
            m.__dict__[_OUT] = (x, part)
    return mine


def auto_fuses(model: torch.nn.Module) -> bool:
    """What ``model.fuse_projections=auto`` settles to for a model that trains on CUDA (no
    FSDP, no ``model.compile``): fused when its LFM2 layers' hidden size (their projections'
    input width) is at most :data:`AUTO_MAX_HIDDEN_SIZE`. The reward model's and PPO's wrappers
    are read through to their LFM2 layers."""
    widths = [m.q_proj.in_features if type(m).__name__ == "Lfm2Attention" else m.w1.in_features
              for m in model.modules() if type(m).__name__ in ("Lfm2Attention", "Lfm2MLP")]
    return bool(widths) and max(widths) <= AUTO_MAX_HIDDEN_SIZE


def install_fused_projections(model: torch.nn.Module) -> int:
    """Fuse the q/k/v projections of every ``Lfm2Attention`` and mark every ``Lfm2MLP`` for the
    lean MLP's fused ``w1``/``w3`` (see the module doc); returns how many groups. Idempotent;
    set on the instances, so other models in the process are untouched."""
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name == "Lfm2Attention":
            group = [m.q_proj, m.k_proj, m.v_proj]
            if not fusable(group):
                continue
            if not getattr(m, "_ptl_fused_qkv", False):
                for lin in group:
                    lin._ptl_siblings = group
                    lin.forward = types.MethodType(_sibling_forward, lin)
                m._ptl_fused_qkv = True
            n += 1
        elif name == "Lfm2MLP" and fusable([m.w1, m.w3]):
            m._ptl_fused_w13 = True
            n += 1
    return n
