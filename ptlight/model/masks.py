"""No fully masked query row reaches SDPA: left padding stays finite on every device.

With left padding (generation prompts, PPO/GRPO rollouts scored in place), a pad position's
query may attend to nothing: causally it sees only earlier positions, and those are padding
too. transformers' ``sdpa_mask`` (5.x) hands such an all-False row to
``scaled_dot_product_attention``, and several CUDA kernels return NaN for it (reported with
torch 2.13 on a B200: NaN logits on exactly the left-padded rows, unslothai/unsloth#9848; the
same mask pattern broke left-padded generation in transformers#47651). The NaN does not stay
on the pad position: attention mixes values with weight 0 (0 · NaN = NaN) and LFM2's short
convolutions multiply pad states by a 0/1 mask (NaN · 0 = NaN), so it reaches the real tokens
and every loss term.

:func:`install` wraps the ``sdpa`` mask function of transformers' ``AttentionMaskInterface``
(the registry transformers provides for this) so that a row with no True entry becomes all
True — what transformers' own ``_unmask_unattended`` did before 5.0. Only rows that attended
to nothing change, and those are pad positions, whose outputs are never scored: as keys they
stay masked for every real query, and LFM2's convolutions zero them before use. So every real
token's output is bitwise what it was (tests/test_masks.py), on the CPU, where the kernels
already returned zeros, as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

_INSTALLED = "_ptlight_unattended_rows_fixed"


def attend_somewhere(mask: Any) -> Any:
    """A boolean ``[B, H, Q, K]`` mask with each all-False query row made all-True; anything
    else (None: SDPA's ``is_causal`` path; float masks) unchanged."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4:
        return mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def install() -> None:
    """Wrap transformers' registered ``sdpa`` mask function (idempotent; process-wide, as the
    registry is)."""
    from transformers.masking_utils import AttentionMaskInterface

    stock = AttentionMaskInterface._global_mapping["sdpa"]
    if getattr(stock, _INSTALLED, False):
        return

    def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        return attend_somewhere(stock(*args, **kwargs))

    setattr(sdpa_mask, _INSTALLED, True)
    sdpa_mask.__wrapped__ = stock  # type: ignore[attr-defined]
    AttentionMaskInterface.register("sdpa", sdpa_mask)
