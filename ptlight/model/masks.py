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

The wrapper also keeps the mask construction off the host on a GPU: transformers skips the
mask (SDPA's ``is_causal`` instead) when no row of the padding mask is padded, which it asks
the host (``_ignore_causal_mask_sdpa``: a read-back of the padding mask, so a wait for every
kernel queued before it, at each forward of a padded batch). Off the CPU, for a forward over
more than one query with a padding mask, the wrapper passes ``allow_is_causal_skip=False``:
the mask is built on the device from the padding mask whatever it holds, and is the causal
mask itself when nothing is padded, so the attention computes the same values through a
masked kernel. Training batches of rows of different lengths are padded, and build the mask
either way. The CPU, where a read-back waits on nothing, and decoding (one query) keep
transformers' skip.

The same holds for the padding mask of recurrent and convolution layers (LFM2's short
convolutions, Mamba-style layers): transformers' ``create_recurrent_attention_mask`` asks the
host whether the mask is all ones, to hand those layers ``None`` instead. :func:`install`
with a model replaces it, in that model's modeling module, by one that off the CPU returns
the padding mask for a multi-token forward whatever it holds, as transformers itself does
under ``torch.compile``; the layers multiply their inputs by it, and multiplying by ones
changes no bit.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_INSTALLED = "_ptlight_unattended_rows_fixed"


def attend_somewhere(mask: Any) -> Any:
    """A boolean ``[B, H, Q, K]`` mask with each all-False query row made all-True; anything
    else (None: SDPA's ``is_causal`` path; float masks) unchanged."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4:
        return mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def install(model: torch.nn.Module | None = None) -> None:
    """Wrap transformers' registered ``sdpa`` mask function (idempotent; process-wide, as the
    registry is); with ``model``, also the recurrent layers' padding mask of its modeling
    module (:func:`_recurrent_mask_on_device`)."""
    from transformers.masking_utils import AttentionMaskInterface

    if model is not None:
        _recurrent_mask_on_device(model)

    stock = AttentionMaskInterface._global_mapping["sdpa"]
    if getattr(stock, _INSTALLED, False):
        return

    signature = inspect.signature(stock)
    params = signature.parameters

    def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
        if "allow_is_causal_skip" in params and _skip_reads_the_host(params, args, kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.arguments["allow_is_causal_skip"] = False
            args, kwargs = bound.args, bound.kwargs
        return attend_somewhere(stock(*args, **kwargs))

    setattr(sdpa_mask, _INSTALLED, True)
    sdpa_mask.__wrapped__ = stock  # type: ignore[attr-defined]
    AttentionMaskInterface.register("sdpa", sdpa_mask)


HOST_SKIP_DEVICES = ("cpu",)  # where transformers' causal-mask skip (a host read) is kept


def _skip_reads_the_host(params: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this mask call would read its padding mask on the host to decide whether to
    skip the mask: a padding mask off the CPU (:data:`HOST_SKIP_DEVICES`), a query of more
    than one position, and the caller allowing the skip. Reads the arguments by name as
    transformers' ``sdpa_mask`` declares them (``q_length`` in 5.x, ``cache_position`` in
    4.5x); any other form is left to transformers."""
    named = dict(zip(params, args))
    named.update(kwargs)
    mask = named.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.device.type in HOST_SKIP_DEVICES:
        return False
    if not named.get("allow_is_causal_skip", True):
        return False
    if "q_length" in named:
        q_length = named["q_length"]
    elif isinstance(named.get("cache_position"), torch.Tensor):
        q_length = named["cache_position"].shape[0]
    else:
        return False
    return isinstance(q_length, int) and q_length > 1


def _recurrent_mask_on_device(model: torch.nn.Module) -> None:
    """In the modeling module of each transformers class in ``model``, replace
    ``create_recurrent_attention_mask`` (imported there by name) with one that skips the
    host's all-ones check off the CPU (idempotent; process-wide for those modules)."""
    import sys

    from transformers import masking_utils

    stock = getattr(masking_utils, "create_recurrent_attention_mask", None)
    if stock is None:
        return
    is_tracing = masking_utils.is_tracing

    def create_recurrent_attention_mask(config: Any, inputs_embeds: torch.Tensor,
                                        attention_mask: torch.Tensor | None, *args: Any,
                                        **kwargs: Any) -> torch.Tensor | None:
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
                and attention_mask.device.type not in HOST_SKIP_DEVICES
                and inputs_embeds.shape[1] > 1 and not is_tracing(attention_mask)):
            return attention_mask[:, -inputs_embeds.shape[1]:].contiguous()
        return stock(config, inputs_embeds, attention_mask, *args, **kwargs)

    create_recurrent_attention_mask.__wrapped__ = stock  # type: ignore[attr-defined]
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()}:
        if getattr(module, "create_recurrent_attention_mask", None) is stock:
            setattr(module, "create_recurrent_attention_mask", create_recurrent_attention_mask)
