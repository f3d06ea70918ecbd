"""Per-token full-vocabulary terms (entropy, KL to the reference) without ``[M, V]`` logits.

The reducer behind :class:`ptlight.objectives.tokens.TokenTerms`. Only the M positions that
predict a completion token reach the LM head (as in :mod:`ptlight.engine.logps`), in chunks of
``chunk_size`` rows; for each chunk the policy's (and, when asked, the reference's) logits are
formed, reduced to a few numbers per position, and discarded. In training each chunk runs
under activation checkpointing, so the backward pass recomputes that chunk's logits instead of
keeping its ``[chunk, V]`` fp32 log-softmax alive: the head's memory is one chunk's logits,
whatever M is, at the price of a second head matmul per chunk in the backward.

The reference side (:func:`reference_side`) is only its last hidden states at the same M
positions (``[M, H]``) plus its head: the reference logits of a chunk are formed inside the
policy's chunk, under ``no_grad``. A precomputed reference that stored sequence sums cannot
give these, which is why :func:`ptlight.model.reference.reference_mode` refuses it.

``pack=K`` takes the prefix-shared packed forward (:mod:`ptlight.engine.packing`); the
hidden states, and so every term, equal the plain path's within fp tolerance.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from ptlight.engine.logps import _completion_hidden, _has_linear_head, _targets
from ptlight.engine.packing import PackedBatch, pack_checked, packed_hidden, supports_packing
from ptlight.objectives.tokens import TOKEN_TERMS, TokenTerms

# columns of a reduced chunk, in order (COLUMNS_REF only when a reference side is given)
COLUMNS = ("logp", "entropy", "correct")
COLUMNS_REF = ("ref_logp", "ref_kl")


@dataclass
class ReferenceSide:
    """What the reference contributes to the chunks: hidden states at the M completion
    positions (``[M, H]``, no gradient) and its LM head's weight ``[V, H]`` and bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def completion_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    loss_mask: torch.Tensor, *, pack: int | None = None, pack_max_tokens: int = 2048,
    packed: PackedBatch | None = None, index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [M, H], targets [M], rows [M], mask [R, T-1])``: the last hidden state that
    predicts each completion token, packed (``pack=K``) when the model supports it.
    ``packed`` (the layout the collate built) and ``index`` (its
    :func:`~ptlight.engine.logps.completion_index`) spare the step the packing and the
    boolean-mask selections, whose sizes a GPU would have to report to the host."""
    if not _has_linear_head(model):
        raise ValueError(
            f"{type(model).__name__} scales or caps its logits after the LM head; per-token "
            "full-vocabulary terms need a linear head (logits = hidden @ W.T + b)")
    mask, targets, rows = _targets(input_ids, loss_mask, index)
    if pack is not None and supports_packing(model):
        if packed is None:
            packed = pack_checked(input_ids, attention_mask, loss_mask, pack, pack_max_tokens)
        return packed_hidden(model, packed), targets, rows, mask
    h = _completion_hidden(model, input_ids, attention_mask, mask, index)
    return h, targets, rows, mask


def reference_side(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    loss_mask: torch.Tensor, *, pack: int | None = None, pack_max_tokens: int = 2048,
    packed: PackedBatch | None = None, index: torch.Tensor | None = None,
) -> ReferenceSide:
    """The reference's hidden states and head (call under ``no_grad`` in its scope)."""
    h, _, _, _ = completion_hidden(model, input_ids, attention_mask, loss_mask, pack=pack,
                                   pack_max_tokens=pack_max_tokens, packed=packed, index=index)
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.detach()
    return ReferenceSide(h.detach(), head.weight.detach(), bias)


def _reduce_chunk(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, ref_h: torch.Tensor | None,
                  ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``[m, C]`` fp32, the :data:`COLUMNS` (+ :data:`COLUMNS_REF`) of m positions."""
    logp = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)  # (m, V)
    cols = [logp.gather(-1, targets[:, None]).squeeze(-1),
            -(logp.exp() * logp).sum(-1),
            (logp.detach().argmax(-1) == targets).float()]
    if ref_h is not None:
        with torch.no_grad():
            ref_logp = torch.log_softmax(F.linear(ref_h, ref_weight, ref_bias).float(), dim=-1)
            ref_p = ref_logp.exp()
            ref_entropy_term = (ref_p * ref_logp).sum(-1)  # Σ p_ref log p_ref
        cols += [ref_logp.gather(-1, targets[:, None]).squeeze(-1),
                 ref_entropy_term - (ref_p * logp).sum(-1)]  # KL(p_ref ‖ p_θ)
    return torch.stack(cols, dim=-1)


def reduce_chunks(
    h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    reference: ReferenceSide | None = None, chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per-position terms of ``h`` ``[M, H]`` through the head ``(weight, bias)``: name ->
    ``[M]`` for :data:`COLUMNS` (and :data:`COLUMNS_REF` with a reference side). Each chunk is
    checkpointed when gradients are being recorded (see the module docstring)."""
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i : i + chunk_size], targets[i : i + chunk_size], weight, bias,
                None if reference is None else reference.hidden[i : i + chunk_size],
                None if reference is None else reference.weight,
                None if reference is None else reference.bias)
        parts.append(checkpoint(_reduce_chunk, *args, use_reentrant=False) if grad
                     else _reduce_chunk(*args))
    names = COLUMNS + (COLUMNS_REF if reference is not None else ())
    if not parts:
        return {n: h.new_zeros(0, dtype=torch.float32) for n in names}
    table = torch.cat(parts)  # (M, C)
    return {n: table[:, j] for j, n in enumerate(names)}


def completion_terms(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    loss_mask: torch.Tensor, terms: Collection[str], *, k: int,
    reference: ReferenceSide | None = None, chunk_size: int = 1024,
    pack: int | None = None, pack_max_tokens: int = 2048,
    packed: PackedBatch | None = None, index: torch.Tensor | None = None,
) -> tuple[TokenTerms, dict[str, torch.Tensor]]:
    """The :class:`TokenTerms` an objective declared (``terms``), plus the token diagnostics
    (``mean_token_accuracy``, ``entropy``, ``num_tokens``, detached) of all R rows.

    ``reference`` (from :func:`reference_side` on the same batch) is required when ``terms``
    names a ``ref_*`` term. ``k``: completions per example (rows are K blocks). ``packed``,
    ``index``: as for :func:`completion_hidden`.
    """
    unknown = set(terms) - set(TOKEN_TERMS)
    if unknown:
        raise ValueError(f"unknown token terms {sorted(unknown)}; known: {TOKEN_TERMS}")
    if reference is None and {"ref_logp", "ref_kl", "ref_hidden"} & set(terms):
        raise ValueError(f"token terms {sorted(terms)} need a reference side")
    h, targets, rows, mask = completion_hidden(model, input_ids, attention_mask, loss_mask,
                                               pack=pack, pack_max_tokens=pack_max_tokens,
                                               packed=packed, index=index)
    head = model.get_output_embeddings()
    use_ref = reference if {"ref_logp", "ref_kl"} & set(terms) else None
    cols = reduce_chunks(h, targets, head.weight, head.bias, use_ref, chunk_size)
    out = TokenTerms(
        logps=cols["logp"], rows=rows, mask=mask, k=k,
        ref_logps=cols["ref_logp"] if "ref_logp" in terms else None,
        entropy=cols["entropy"] if "entropy" in terms else None,
        ref_kl=cols["ref_kl"] if "ref_kl" in terms else None,
        hidden=h if "hidden" in terms else None,
        ref_hidden=reference.hidden if reference is not None and "ref_hidden" in terms else None,
    )
    n = targets.numel()
    zero = h.new_zeros((), dtype=torch.float32)
    diagnostics = {
        "mean_token_accuracy": cols["correct"].mean() if n else zero,
        "entropy": cols["entropy"].detach().mean() if n else zero,
        "num_tokens": zero + n,
    }
    return out, diagnostics
