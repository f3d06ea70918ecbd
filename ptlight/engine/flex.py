"""FlexAttention for packed rows: the trie mask as a block-sparse ``BlockMask``
(``model.packed_attention=flex``).

The packed forward (:mod:`ptlight.engine.packing`) lets token i attend token j iff
``j <= i < end(j)`` (j is i or one of its ancestors in the row's depth-first layout). With
``sdpa`` that mask is a dense ``[R, 1, N, N]`` boolean tensor, so SDPA runs its masked kernel
over every block of every row, including the blocks above the diagonal and those between two
groups, which the mask zeroes whole. With ``flex`` the same rule is a FlexAttention
``mask_mod`` over the rows' ``end`` column: ``create_block_mask`` records which 128×128 blocks
hold any allowed pair, and the kernel skips the rest; one compiled kernel serves every packed
width (no per-shape planning, as cuDNN's attention does).

Only the packed call changes: :func:`install_flex_attention` gives LFM2's attention layers a
forward that runs FlexAttention when its mask is a ``BlockMask``, which only the packed
forward passes; any other mask (the padded path, generation) takes the stock forward. The
layer's projections, q/k norms and rotary embedding are the stock ones (same modules, same
function from the layer's own modeling file), so the scores equal SDPA's with the dense mask
within float rounding (``tests/test_flex.py``).

Where it runs: torch's FlexAttention has no backward on the CPU (torch 2.13:
"FlexAttention does not support backward on CPU"), so a training run on the CPU refuses
``flex`` before any weights load; a no-grad forward (the reference precompute) runs there
through FlexAttention's unfused path. On CUDA the kernel is ``torch.compile``'d once per
process (as transformers compiles its own flex path).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_COMPILED: dict[str, Any] = {}


def _flex(device_type: str) -> Any:
    """FlexAttention compiled for CUDA (one compiled kernel, dynamic shapes after the first
    new width); the unfused eager function elsewhere (CPU: no-grad forwards only)."""
    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(flex_attention)
    return _COMPILED["cuda"]


def tree_block_mask(end: torch.Tensor) -> BlockMask:
    """The packed rows' mask (``end``: ``[R, N]``, the column after each token's subtree) as a
    ``BlockMask``: query q may attend key kv iff ``kv <= q < end[b, kv]``; the same rule as
    :meth:`ptlight.engine.packing.PackedBatch.attention_mask`."""
    rows, width = end.shape

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
                 ) -> torch.Tensor:
        return (kv <= q) & (q < end[b, kv])

    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width,
                             device=end.device)


def _flex_attention_forward(self: Any, hidden_states: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor],
                            attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``Lfm2Attention.forward`` with FlexAttention for a ``BlockMask``; the stock forward
    for anything else."""
    if not isinstance(attention_mask, BlockMask):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  *args, **kwargs)
    if args or any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        raise ValueError("a BlockMask comes from the packed forward, which runs without a cache")
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_layernorm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
    k = self.k_layernorm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    device = q.device.type
    # one dtype for the three, as autocast casts SDPA's operands; without autocast, q/k norms
    # with fp32 weights may have promoted q and k
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = _flex(device)(q, k, v, block_mask=attention_mask, scale=self.scaling,
                        enable_gqa=q.shape[1] != k.shape[1])
    out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return self.out_proj(out), None


def install_flex_attention(model: torch.nn.Module) -> int:
    """Let every ``Lfm2Attention`` of ``model`` run FlexAttention for a ``BlockMask`` (set on
    the instances, so other models are untouched; ``copy.deepcopy`` carries it to a
    reference copy), and mark the model so that the packed forward builds one. Idempotent;
    returns how many layers it covers (0: no LFM2 attention, nothing marked)."""
    layers = [m for m in model.modules() if type(m).__name__ == "Lfm2Attention"]
    for m in layers:
        if not getattr(m, "_ptl_flex", False):
            m.forward = types.MethodType(_flex_attention_forward, m)
            m._ptl_flex = True
    if layers:
        for m in model.modules():
            m._ptl_flex_attention = True  # type: ignore[assignment]
    return len(layers)


def uses_flex(model: torch.nn.Module) -> bool:
    """Whether :func:`install_flex_attention` has marked ``model`` (or its backbone)."""
    return bool(getattr(model, "_ptl_flex_attention", False))
