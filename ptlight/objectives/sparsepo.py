"""SparsePO: token-masked DPO (Christopoulou et al. 2024, arXiv 2410.05102).

Per completion token t (OBJECTIVES.md §9):

    q_t = ℓ_θ(t) − ℓ_ref(t)
    k_t = Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v))          (KL(p_ref ‖ p_θ), full vocabulary)
    u   = β·[Σ_t m^u_t q_t (y_w) − Σ_t m^u_t q_t (y_l)]
    δ   = β·[Σ_t m^d_t k_t (y_l) − Σ_t m^d_t k_t (y_w)]
    L   = −log σ(u − δ)                                        (batch mean over pairs)

m^u ≡ 1, m^d ≡ 0 is DPO; m^u ≡ m^d ≡ 1 is TDPO1 (:mod:`ptlight.objectives.tdpo`). Both are
tests. Masks (``mask``):

- ``learnable``: m_t = ReLU(w·h_t + b) on the policy's last hidden state h_t (a linear layer
  of this objective, trained with the policy; gradients also reach h_t). Initialised w = 0,
  b = 1, so training starts exactly at TDPO1. ``shared_masks=False`` gives m^u and m^d their
  own layers.
- ``activation``: from the frozen reference's hidden states: a_t = mean over units of the
  reference's last hidden state at t, m_t = ReLU(a_t) / max_{t'∈y} ReLU(a_{t'}) (0 for a
  sequence whose a is ≤ 0 everywhere), one mask for both terms. Deviation, said plainly: the
  paper aggregates activations over all layers; ptlight's reducer hands objectives the last
  hidden states only, and the exact per-layer normalisation could not be confirmed from the
  paper here, so this is the last-layer reading of it. ``shared_masks=False`` is refused.

Metrics: the DPO metrics computed with the masked rewards (``rewards/*`` from β·Σ m^u q),
``kl/chosen``, ``kl/rejected`` (mean unmasked sequence KL Σ_t k_t), ``mask/sparsity_chosen``,
``mask/sparsity_rejected`` (fraction of mask values exactly 0, over m^u and m^d),
``mask/mean``. At initialisation (policy = reference) q = k = 0 and the loss is ln 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import Objective, ObjectiveOutput, sigmoid_metrics
from ptlight.objectives.tokens import TokenTerms, require

MASKS = ("learnable", "activation")


def masked_margin(terms: TokenTerms, m_u: torch.Tensor, m_d: torch.Tensor, beta: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u [B], δ [B], q_sums [B, 2])`` from per-token masks ``m_u``, ``m_d`` ``[M]``;
    ``q_sums`` = Σ m^u q per sequence (column 0 chosen)."""
    q = terms.logps.float() - require(terms, "ref_logps", "sparsepo").float()  # (M,)
    k = require(terms, "ref_kl", "sparsepo").float()
    q_sums = terms.columns(m_u * q)  # (B, 2)
    k_sums = terms.columns(m_d * k)
    u = beta * (q_sums[:, 0] - q_sums[:, 1])
    delta = beta * (k_sums[:, 1] - k_sums[:, 0])
    return u, delta, q_sums


def kl_metrics(terms: TokenTerms) -> dict[str, torch.Tensor]:
    """``kl/chosen``, ``kl/rejected``: mean sequence KL(p_ref ‖ p_θ) (unmasked)."""
    seq_kl = terms.columns(require(terms, "ref_kl", "kl_metrics").detach().float())
    return {"kl/chosen": seq_kl[:, 0].mean(), "kl/rejected": seq_kl[:, 1].mean()}


def pair_metrics(terms: TokenTerms, q_sums: torch.Tensor, beta: float
                 ) -> dict[str, torch.Tensor]:
    """The shared pairwise metrics with masked rewards β·Σ m^u q, plus the KL metrics."""
    policy = terms.columns(terms.logps.detach().float())
    return {**sigmoid_metrics(beta * q_sums[:, 0], beta * q_sums[:, 1], policy),
            **kl_metrics(terms)}


class SparsePO(Objective):
    """Token-masked DPO with ``learnable`` or ``activation`` masks."""

    name = "sparsepo"
    needs_reference = True
    data_kind = "pairwise"
    token_terms = ("logp", "ref_logp", "ref_kl", "hidden", "ref_hidden")

    def __init__(self, *, beta: float = 0.1, mask: str = "learnable",
                 shared_masks: bool = True) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"sparsepo: beta must be > 0, got {beta}")
        if mask not in MASKS:
            raise ValueError(f"sparsepo: mask={mask!r}; use one of {MASKS}")
        if mask == "activation" and not shared_masks:
            raise ValueError("sparsepo: activation masks are one mask for both terms; "
                             "shared_masks=false needs mask=learnable")
        self.beta, self.mask, self.shared_masks = beta, mask, shared_masks
        self.mask_u: torch.nn.Linear | None = None
        self.mask_d: torch.nn.Linear | None = None

    def bind_hidden_size(self, hidden_size: int) -> None:
        """Create the learnable mask layers for the policy's hidden size (the method calls
        this before the optimiser is built; a no-op for activation masks)."""
        if self.mask != "learnable":
            return
        self.mask_u = _mask_layer(hidden_size)
        self.mask_d = None if self.shared_masks else _mask_layer(hidden_size)

    def masks(self, terms: TokenTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m^u, m^d)``, each ``[M]`` ≥ 0."""
        if self.mask == "activation":
            m = activation_mask(terms)
            return m, m
        if self.mask_u is None:
            raise RuntimeError("sparsepo: learnable masks need bind_hidden_size() first")
        h = require(terms, "hidden", self.name)
        m_u = F.relu(self.mask_u(h.to(self.mask_u.weight.dtype))).squeeze(-1).float()
        if self.mask_d is None:
            return m_u, m_u
        return m_u, F.relu(self.mask_d(h.to(self.mask_d.weight.dtype))).squeeze(-1).float()

    def forward(self, inputs: TokenTerms) -> ObjectiveOutput:
        m_u, m_d = self.masks(inputs)
        u, delta, q_sums = masked_margin(inputs, m_u, m_d, self.beta)
        losses = F.softplus(-(u - delta))
        metrics = pair_metrics(inputs, q_sums, self.beta)
        metrics.update(mask_metrics(inputs, m_u, m_d))
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)


def _mask_layer(hidden_size: int) -> torch.nn.Linear:
    layer = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.ones_(layer.bias)  # m ≡ 1 at the start: SparsePO starts as TDPO1
    return layer


def activation_mask(terms: TokenTerms) -> torch.Tensor:
    """``[M]`` m_t = ReLU(a_t) / max over the row's tokens, a_t = mean_j h^ref_{t,j}."""
    a = F.relu(require(terms, "ref_hidden", "sparsepo").float().mean(-1))  # (M,)
    row_max = a.new_zeros(terms.mask.shape[0]).scatter_reduce(0, terms.rows, a, "amax")
    scale = row_max[terms.rows]
    return torch.where(scale > 0, a / scale.clamp(min=1e-12), torch.zeros_like(a))


def mask_metrics(terms: TokenTerms, m_u: torch.Tensor, m_d: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """``mask/sparsity_chosen|rejected`` (share of exact zeros over m^u and m^d) and
    ``mask/mean``."""
    with torch.no_grad():
        zero = ((m_u == 0).float() + (m_d == 0).float()) / 2  # (M,)
        b = terms.mask.shape[0] // terms.k
        chosen = terms.rows < b
        out = {}
        for side, sel in (("chosen", chosen), ("rejected", ~chosen)):
            sel = sel.float()  # a side without tokens reports 0
            out[f"mask/sparsity_{side}"] = (zero * sel).sum() / sel.sum().clamp(min=1)
        out["mask/mean"] = ((m_u + m_d) / 2).mean() if m_u.numel() else m_u.new_zeros(())
    return out
