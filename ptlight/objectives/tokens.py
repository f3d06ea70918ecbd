"""Per-token inputs of objectives that need more than sequence sums (the reducer API).

An objective declares the per-position quantities it needs in its class attribute
``token_terms`` (a tuple of names from :data:`TOKEN_TERMS`); a method that drives it then
hands it a :class:`TokenTerms` instead of :class:`~ptlight.objectives.base.Logps`. The engine
(:mod:`ptlight.engine.token_terms`) computes the full-vocabulary terms chunk by chunk from the
hidden states and the LM head, never holding ``[tokens × vocab]`` logits for the whole batch;
the objective only ever sees ``[M]`` (or ``[M, H]``) tensors, M = completion tokens.

Names (what each costs is in docs/objectives.md, "Per-token terms"):

- ``logp``: ℓ_θ(t), the policy's log-prob of the target token (always computed).
- ``ref_logp``: ℓ_ref(t), the same under the reference (no gradient).
- ``entropy``: H_t = −Σ_v p_θ(v) log p_θ(v), the policy's full-vocabulary entropy.
- ``ref_kl``: k_t = Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v)) = KL(p_ref ‖ p_θ) at t.
- ``hidden``: the policy's last hidden state that predicts token t.
- ``ref_hidden``: the reference's (no gradient).

Terms named ``ref_*`` need a reference model run live at every completion position:
``method.reference=copy`` (``adapter`` under LoRA). A reference-free run or a precomputed one
(which stores sequence sums only) is refused before weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_TERMS = ("logp", "ref_logp", "entropy", "ref_kl", "hidden", "ref_hidden")
REFERENCE_TERMS = frozenset({"ref_logp", "ref_kl", "ref_hidden"})


@dataclass
class TokenTerms:
    """Per completion token of a batch of R = K·B rows (block k = completion k of every
    example, as the data module collates them; pairwise K=2: chosen block, rejected block).
    Tokens are in row-major order of ``mask``. A term the objective did not declare is None.

    logps:      ``[M]`` fp32 ℓ_θ(t) (carries gradient).
    rows:       ``[M]`` long, the row of each token.
    mask:       ``[R, T-1]`` bool, the target positions these tokens are.
    k:          completions per example (``R // k`` examples).
    ref_logps:  ``[M]`` ℓ_ref(t).
    entropy:    ``[M]`` policy entropy (carries gradient).
    ref_kl:     ``[M]`` KL(p_ref ‖ p_θ) (gradient through p_θ).
    hidden:     ``[M, H]`` policy hidden states (carry gradient).
    ref_hidden: ``[M, H]`` reference hidden states.
    """

    logps: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor
    k: int
    ref_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    ref_kl: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None

    def sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``[R]`` sum of ``values`` ``[M]`` over each row's completion tokens."""
        out = values.new_zeros(self.mask.shape[0])
        return out.index_add(0, self.rows, values)

    def columns(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` per-example sums of ``values`` ``[M]`` (column 0: the chosen)."""
        return self.sequence_sum(values).view(self.k, -1).T

    def lengths(self) -> torch.Tensor:
        """``[B, K]`` completion token counts."""
        return self.mask.sum(dim=1).view(self.k, -1).T


def require(terms: TokenTerms, name: str, objective: str) -> torch.Tensor:
    """``terms.<name>``, or a ValueError saying the objective must declare it."""
    value = getattr(terms, name)
    if value is None:
        raise ValueError(f"{objective}: TokenTerms.{name} is None; declare it in token_terms")
    return value
