"""Log-probabilities of completion tokens, computed without ``[B, T, V]`` logits.

The backbone returns hidden states ``[B, T, H]``; only the positions that predict a completion
token (``loss_mask[:, 1:]``) go through the LM head, in row chunks, and the log-softmax is taken
in fp32. This equals ``log_softmax(model(ids).logits).gather(...)`` (tested) while keeping the
logits of prompt and padding positions out of memory entirely.

Models whose head is more than a linear layer (logit soft-capping, logit scaling) take the
plain path through ``model(...).logits`` so that results stay exact.

``pack=K`` (the DPO fast path, :mod:`ptlight.engine.packing`) runs each example's prompt once with its
K completions as branches, packed without padding; the scores are the same tokens in the same
order, equal to the plain path within fp tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from ptlight.engine.packing import PackedBatch, base_forward, pack_checked, packed_hidden
from ptlight.engine.packing import supports_packing

_NON_LINEAR_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TokenScores:
    """Per completion token (M tokens in the batch, in row-major order of ``loss_mask``).

    logps:   ``[M]`` fp32 log-prob of the target token (carries gradient when the model does).
    rows:    ``[M]`` batch row of each token.
    correct: ``[M]`` bool, argmax == target (detached).
    entropy: ``[M]`` entropy of the predictive distribution (detached).
    mean_logp: ``[M]`` mean over the vocabulary of log p (for label smoothing), or None.
    mask:    ``[B, T-1]`` bool, which target positions these tokens are.
    """

    logps: torch.Tensor
    rows: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor
    mean_logp: torch.Tensor | None
    mask: torch.Tensor

    def sequence_sum(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` sum over each row's completion tokens of ``values`` (default: logps)."""
        values = self.logps if values is None else values
        out = torch.zeros(self.mask.shape[0], dtype=values.dtype, device=values.device)
        return out.index_add(0, self.rows, values)

    def lengths(self) -> torch.Tensor:
        """``[B]`` completion token count of each row."""
        return self.mask.sum(dim=1)

    def to_dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T-1]`` with ``values`` at completion positions and 0 elsewhere.

        Each position gathers its value (the k-th completion position the k-th value, every
        other position an appended zero), so the backward is a scatter-add: neither way asks
        the device how many positions the mask holds (``masked_scatter``'s backward does)."""
        values = self.logps if values is None else values
        flat = self.mask.reshape(-1)
        slot = torch.where(flat, flat.cumsum(0) - 1, values.shape[0])
        source = torch.cat([values, values.new_zeros(1)])
        return source.index_select(0, slot).view(self.mask.shape)


def _has_linear_head(model: PreTrainedModel) -> bool:
    cfg = model.config
    return not any(getattr(cfg, a, None) not in (None, 1.0) for a in _NON_LINEAR_HEAD_ATTRS)


def _score_rows(
    logits: torch.Tensor, targets: torch.Tensor, with_mean_logp: bool,
    with_diagnostics: bool = True,
) -> tuple[torch.Tensor, ...]:
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # (m, V) fp32
    logps = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_diagnostics:
        empty = logps.new_zeros(0)
        return logps, empty.bool(), empty, logp_all.mean(-1) if with_mean_logp else None
    with torch.no_grad():
        p = logp_all.detach().exp()
        entropy = -(p * logp_all.detach()).sum(-1)
        correct = logp_all.detach().argmax(-1) == targets
    mean_logp = logp_all.mean(-1) if with_mean_logp else None
    return logps, correct, entropy, mean_logp


def _score_chunk(
    h: torch.Tensor, local: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
    with_mean_logp: bool, with_diagnostics: bool,
) -> tuple[torch.Tensor, ...]:
    """:func:`_score_rows` for targets whose hidden states are ``h[local]``: the head and
    log-softmax run once per row of ``h``."""
    logp_all = torch.log_softmax(F.linear(h, head.weight, head.bias).float(), dim=-1)
    logps = logp_all[local, targets]
    mean_logp = logp_all.mean(-1)[local] if with_mean_logp else None
    if not with_diagnostics:
        empty = logps.new_zeros(0)
        return logps, empty.bool(), empty, mean_logp
    with torch.no_grad():
        lp = logp_all.detach()
        entropy = -(lp.exp() * lp).sum(-1)[local]
        correct = lp.argmax(-1)[local] == targets
    return logps, correct, entropy, mean_logp


def _score_shared(
    h: torch.Tensor, inverse: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
    chunk_size: int, with_mean_logp: bool, with_diagnostics: bool,
) -> list[tuple[torch.Tensor, ...]]:
    """:func:`_score_rows` for M targets whose hidden states are ``h[inverse]`` (U distinct
    rows): the head and log-softmax run on the U rows only, in chunks; one part, in target
    order. With one chunk (U <= chunk_size) no index is computed from the data, so nothing
    waits on the device."""
    if h.shape[0] <= chunk_size:
        return [_score_chunk(h, inverse, targets, head, with_mean_logp, with_diagnostics)]
    order, parts = [], []
    for i in range(0, h.shape[0], chunk_size):
        sel = ((inverse >= i) & (inverse < i + chunk_size)).nonzero().squeeze(1)
        parts.append(_score_chunk(h[i : i + chunk_size], inverse[sel] - i, targets[sel], head,
                                  with_mean_logp, with_diagnostics))
        order.append(sel)
    perm = torch.cat(order)
    back = torch.empty_like(perm)
    back[perm] = torch.arange(perm.numel(), device=perm.device)

    def joined(i: int) -> torch.Tensor | None:
        x = None if parts[0][i] is None else torch.cat([p[i] for p in parts])
        return x if x is None or (i in (1, 2) and not with_diagnostics) else x[back]

    return [tuple(joined(i) for i in range(4))]


# RL scoring (:func:`target_logps`): a chunk is at least as many rows as the hidden size (each
# chunk's backward makes a [V, H] weight gradient, added to the others: fewer rows would spend
# more on those than on the chunk's own logits), and at least HEAD_CHUNK_BYTES of fp32
# log-probs; the chunks are checkpointed when the whole [M, V] block would pass
# HEAD_CHECKPOINT_BYTES
HEAD_CHUNK_BYTES = 64 * 2**20
HEAD_CHECKPOINT_BYTES = 2**30


def head_chunk_rows(vocab: int, hidden: int) -> int:
    """Rows of hidden states :func:`target_logps` sends through the LM head at once."""
    return max(hidden, HEAD_CHUNK_BYTES // (4 * vocab), 1)


def _target_logps_chunk(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(F.linear(h, weight, bias).float() / temperature, dim=-1)
    logps = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    # last, so that a checkpointed chunk's recomputation (which stops once the saved tensors
    # are rebuilt) skips it; without a graph, as a recorded one would keep exp(logp) alive
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def target_logps(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, temperature: float = 1.0,
                 chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([M] log-probs, [M] entropies)`` of ``targets`` under ``log_softmax((h @ W.T + b) /
    temperature)`` for ``h`` ``[M, H]``, in chunks of ``chunk_rows`` rows (default
    :func:`head_chunk_rows`: at a 65,536-token vocabulary, H rows or 256, whichever is more).
    The log-probs carry the graph; the entropies are detached (a metric).

    The chunks bound the forward's and the backward's transient ``[rows, V]`` tensors (the
    logits, the log-softmax's gradient) to one chunk's; the backward keeps each chunk's fp32
    log-softmax, one ``[M, V]`` block in all. Past :data:`HEAD_CHECKPOINT_BYTES` of it each
    chunk runs under activation checkpointing instead: the backward recomputes a chunk's
    logits (a second head matmul) and nothing vocabulary-sized lives from the forward to the
    backward. Equals the one-block computation within fp tolerance (tested)."""
    vocab, hidden = weight.shape
    chunk = chunk_rows or head_chunk_rows(vocab, hidden)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    recompute = grad and 4 * h.shape[0] * vocab > HEAD_CHECKPOINT_BYTES
    parts = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i : i + chunk], targets[i : i + chunk], weight, bias, temperature)
        parts.append(checkpoint(_target_logps_chunk, *args, use_reentrant=False) if recompute
                     else _target_logps_chunk(*args))
    if not parts:
        empty = h.new_zeros(0, dtype=torch.float32)
        return empty, empty
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _targets(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target positions ``[B, T-1]``, their tokens ``[M]`` and batch rows ``[M]``; from
    ``index`` (:func:`completion_index`) when given, without a boolean-mask selection."""
    mask = loss_mask[:, 1:].bool()  # (B, T-1): target positions
    if index is not None:
        return mask, input_ids.reshape(-1)[index + 1], index // input_ids.shape[1]
    targets = input_ids[:, 1:][mask]  # (M,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(mask)[mask]
    return mask, targets, rows


def completion_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """``[M]`` flat indices into ``[B, T]`` of the positions that predict a completion token
    (position t predicts the token at t+1), in row-major order. Built by the collate on the
    host and passed as ``index=``, it spares the step the boolean-mask selections whose output
    size a GPU must report back to the host."""
    b, t = loss_mask.shape
    flat = loss_mask[:, 1:].reshape(-1).nonzero().squeeze(1)  # into [B, T-1]
    return flat + flat // (t - 1) if t > 1 else flat


def backbone_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``[B, T, H]`` last hidden states of a causal LM's backbone (no LM head; under FSDP see
    :func:`ptlight.engine.packing.base_forward`)."""
    out = base_forward(model, input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def _completion_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    mask: torch.Tensor, index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, H]`` last hidden states at the positions that predict a completion token (at
    ``index`` when given, else where ``mask`` is True)."""
    return _at_completions(backbone_hidden(model, input_ids, attention_mask), mask, index)


def _at_completions(x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None
                    ) -> torch.Tensor:
    """``[M, D]`` rows of ``x`` ``[B, T, D]`` at the positions that predict a completion
    token: at the flat ``index`` (:func:`completion_index`) when given, which needs no
    answer from the device, else where ``mask`` ``[B, T-1]`` is True."""
    if index is not None:
        return x.reshape(-1, x.shape[-1]).index_select(0, index)
    return x[:, :-1][mask]


@dataclass
class CompletionLogits:
    """Full-vocabulary logits at the M completion positions of a batch (row-major order).

    logits:  ``[M, V]`` in the model's dtype (carries gradient when the model does).
    targets: ``[M]`` the token each position predicts.
    rows:    ``[M]`` batch row of each position.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


def completion_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    loss_mask: torch.Tensor, index: torch.Tensor | None = None,
) -> CompletionLogits:
    """Logits ``[M, V]`` where ``loss_mask`` is True, for losses that need the whole
    distribution (R-Drop). Same path as :func:`completion_logps` (only completion positions go
    through a linear head; other heads take ``model(...).logits``), but the ``[M, V]`` block is
    returned whole instead of being reduced chunk by chunk. ``index``: as for
    :func:`completion_logps`."""
    mask, targets, rows = _targets(input_ids, loss_mask, index)
    if _has_linear_head(model):
        head = model.get_output_embeddings()
        h = _completion_hidden(model, input_ids, attention_mask, mask, index)  # (M, H)
        logits = F.linear(h, head.weight, head.bias)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = _at_completions(out.logits, mask, index)
    return CompletionLogits(logits, targets, rows)


def completion_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = 2048,
    with_mean_logp: bool = False,
    with_diagnostics: bool = True,
    pack: int | None = None,
    pack_max_tokens: int = 2048,
    packed: PackedBatch | None = None,
    index: torch.Tensor | None = None,
) -> TokenScores:
    """Score every token where ``loss_mask`` is True (the token at t is predicted from t−1).

    input_ids, attention_mask, loss_mask: ``[B, T]``. Padding must be on the right or masked.
    with_diagnostics=False skips ``correct``/``entropy`` (empty tensors; reference scoring).
    pack=K: rows are K blocks of the same prompts (pairwise K=2: chosen block, rejected block);
    score them prefix-shared and packed into rows of at most ``pack_max_tokens`` tokens when
    the model supports it (:func:`ptlight.engine.packing.supports_packing`), else the plain way.
    packed: that layout already built for this batch (by the collate, on the host); used with
    ``pack`` instead of packing here, so the step computes no index from device data.
    index: :func:`completion_index` of ``loss_mask``, likewise built ahead (the unpacked path).
    """
    if pack is not None and _has_linear_head(model) and supports_packing(model):
        if packed is None:
            packed = pack_checked(input_ids, attention_mask, loss_mask, pack, pack_max_tokens)
        mask, targets, rows = loss_mask[:, 1:].bool(), packed.targets, packed.rows
        # a shared trie node predicts the next token of every row through it: run the head
        # once per distinct node (U <= M), then pick each row's target
        h = packed_hidden(model, packed, packed.positions)  # (U, H)
        parts = _score_shared(h, packed.inverse, targets, model.get_output_embeddings(),
                              chunk_size, with_mean_logp, with_diagnostics)
        return _joined(parts, rows, mask, input_ids.device, with_mean_logp)
    mask, targets, rows = _targets(input_ids, loss_mask, index)
    if _has_linear_head(model):
        h = _completion_hidden(model, input_ids, attention_mask, mask, index)  # (M, H)
        head = model.get_output_embeddings()
        parts = [
            _score_rows(F.linear(h[i : i + chunk_size], head.weight, head.bias),
                        targets[i : i + chunk_size], with_mean_logp, with_diagnostics)
            for i in range(0, h.shape[0], chunk_size)
        ]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        parts = [_score_rows(_at_completions(logits, mask, index), targets, with_mean_logp,
                             with_diagnostics)]
    return _joined(parts, rows, mask, input_ids.device, with_mean_logp)


def _joined(parts: list[tuple[torch.Tensor, ...]], rows: torch.Tensor, mask: torch.Tensor,
            device: torch.device, with_mean_logp: bool) -> TokenScores:
    if not parts:  # no completion token in the batch
        empty = torch.zeros(0, device=device)
        parts = [(empty, empty.bool(), empty, empty if with_mean_logp else None)]
    logps, correct, entropy, mean_logp = (
        (parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts]))
        if parts[0][i] is not None else None for i in range(4)
    )
    return TokenScores(logps, rows, correct, entropy, mean_logp, mask)
