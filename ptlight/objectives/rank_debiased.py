"""Rank-debiased listwise DPO: λ-weighted pairwise DPO over K ranked completions (LiPO-λ,
Liu et al. 2024, arXiv 2402.01878, with per-prompt normalisation; DPO App. A.3,
arXiv 2305.18290; RankDPO, arXiv 2410.18013).

    s_k  = β·(S_θ(y_k) − S_ref(y_k)) + length_alpha·|y_k|
    P    = {(i, j): ψ_i > ψ_j}
    τ_k  = 1-based position of k sorting stopgrad(s) descending (ties: ψ descending, then index)
    G_k  = 2^{ψ_k} − 1,   D(τ) = log₂(1 + τ)
    w_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)|          (no gradient; ``weighting="uniform"``: w ≡ 1)
    ℓ(x) = Σ_P w_ij·softplus(−(s_i − s_j)) / Σ_P w_ij  (``normalize="none"``: no denominator,
                                                          which is LiPO-λ)
    L    = mean of ℓ over the prompts whose P is non-empty

Labels ψ ∈ [0, 1], higher = better. Without ``Logps.scores`` they come from the column order
(columns are ordered best first): ψ_k = (K − r_k)/(K − 1) with r_k = k + 1. With scores (graded
ratings, ties allowed) ψ is the per-prompt min/max normalisation (score − min)/(max − min), so the
best item has ψ = 1 and the worst ψ = 0 whatever the rating scale; a prompt whose scores are all
equal has ψ ≡ 0. Prompts with empty P (all tied) are skipped and not counted; their entry in
``losses`` is 0. An all-skipped batch gives loss 0 that still has a gradient path (no NaN).

Choice where the papers are silent: ``label_smoothing`` ε applies per pair as in cDPO,
(1−ε)·softplus(−(s_i−s_j)) + ε·softplus(s_i−s_j), so at K = 2 the loss equals ``dpo`` with the
same ``label_smoothing``. At K = 2 with ψ = (1, 0) and ``normalize="prompt"`` the loss is exactly
DPO's; all-zero s gives ln 2.

Metrics: ``rewards/chosen`` / ``rewards/rejected`` and ``logps/top`` / ``logps/bottom``: s and
S_θ of the best (first argmax ψ) and worst (last argmin ψ) item; ``rewards/margins`` and
``rewards/accuracies``: mean of s_i − s_j and fraction with s_i > s_j over all pairs of P in the
batch; ``rank/ndcg``: NDCG of the order τ against gains G; ``rank/kendall_tau``: (concordant −
discordant)/|P| over P (pairs tied in s count as neither); both averaged over non-skipped prompts.
``rank/valid_pairs`` / ``rank/valid_prompts``: counts of pairs in P and of non-skipped prompts.
Because ties in s are broken by ψ, NDCG is 1 at initialisation while Kendall τ is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput

WEIGHTINGS = ("lambda", "uniform")
NORMALIZATIONS = ("prompt", "none")


def rank_labels(
    scores: torch.Tensor | None, batch: int, k: int, device: torch.device
) -> torch.Tensor:
    """ψ ``[B, K]`` in [0, 1]: min/max-normalised scores, else (K − r)/(K − 1) from column order."""
    if scores is None:
        psi = torch.arange(k - 1, -1, -1, device=device, dtype=torch.float32) / (k - 1)
        return psi.expand(batch, k)
    scores = scores.detach().float()
    low = scores.min(dim=1, keepdim=True).values
    span = scores.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (scores - low) / torch.where(span > 0, span, 1.0), 0.0)


def sort_positions(s: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """τ ``[B, K]``: 1-based rank of each item by s descending, ties by ψ descending, then index."""
    by_label = torch.argsort(psi, dim=1, descending=True, stable=True)  # ties: index ascending
    by_score = torch.argsort(s.gather(1, by_label), dim=1, descending=True, stable=True)
    order = by_label.gather(1, by_score)  # (B, K) item at each position
    ranks = torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks).float()


def lambda_weights(
    psi: torch.Tensor, tau: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """w_ij = |G_i − G_j|·|1/D(τ_i) − 1/D(τ_j)| for the item pairs (i, j), ``[B, n_pairs]``."""
    gain = torch.exp2(psi) - 1
    inv_discount = 1 / torch.log2(1 + tau)
    return (gain[:, i] - gain[:, j]).abs() * (inv_discount[:, i] - inv_discount[:, j]).abs()


def ndcg(psi: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per-prompt NDCG ``[B]`` of the order τ with gains 2^ψ − 1 (0 where the ideal DCG is 0)."""
    gain = torch.exp2(psi) - 1
    dcg = (gain / torch.log2(1 + tau)).sum(dim=1)
    ideal_pos = torch.arange(2, psi.shape[1] + 2, device=psi.device, dtype=torch.float32)
    idcg = (gain.sort(dim=1, descending=True).values / torch.log2(ideal_pos)).sum(dim=1)
    return torch.where(idcg > 0, dcg / torch.where(idcg > 0, idcg, 1.0), 0.0)


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class RankDebiased(Objective):
    """λ-weighted listwise DPO over K ≥ 2 ranked completions (``Logps.policy`` ``[B, K]``)."""

    name = "rank_debiased"
    needs_reference = True
    data_kind = "listwise"

    def __init__(
        self,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        length_alpha: float = 0.0,
        weighting: str = "lambda",
        normalize: str = "prompt",
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"rank_debiased: beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"rank_debiased: label_smoothing must be in [0, 0.5), got {label_smoothing}"
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"rank_debiased: weighting must be one of {WEIGHTINGS}, got {weighting!r}"
            )
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"rank_debiased: normalize must be one of {NORMALIZATIONS}, got {normalize!r}"
            )
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.length_alpha = length_alpha
        self.weighting = weighting
        self.normalize = normalize

    def _scores(
        self, inputs: Logps, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """s ``[B, K]`` and the differences s_i − s_j ``[B, n_pairs]`` for the pairs (i, j)."""
        rho = inputs.policy.float() - inputs.reference.float()  # (B, K)
        s = self.beta * rho
        diff = self.beta * (rho[:, i] - rho[:, j])  # same ops as dpo at K = 2
        if self.length_alpha != 0:
            if inputs.lengths is None:
                raise ValueError("rank_debiased: length_alpha != 0 needs Logps.lengths")
            lengths = inputs.lengths.float()
            s = s + self.length_alpha * lengths
            diff = diff + self.length_alpha * (lengths[:, i] - lengths[:, j])
        return s, diff

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("rank_debiased needs reference log-probs (Logps.reference is None)")
        if inputs.policy.dim() != 2 or inputs.policy.shape[1] < 2:
            raise ValueError(
                f"rank_debiased expects Logps.policy [B, K] with K >= 2, got "
                f"{tuple(inputs.policy.shape)}"
            )
        batch, k = inputs.policy.shape
        i, j = torch.triu_indices(k, k, offset=1, device=inputs.policy.device)  # pairs i < j
        s, diff = self._scores(inputs, i, j)
        psi = rank_labels(inputs.scores, batch, k, s.device)  # (B, K)
        sign = torch.sign(psi[:, i] - psi[:, j])  # (B, n_pairs): +1 i better, −1 j better, 0 tie
        pairs = sign != 0  # P, each unordered pair once
        margin = sign * diff  # s_better − s_worse on P
        tau = sort_positions(s.detach(), psi)
        if self.weighting == "lambda":
            weights = lambda_weights(psi, tau, i, j) * pairs
        else:
            weights = pairs.float()
        if self.normalize == "prompt":
            total = weights.sum(dim=1, keepdim=True)
            weights = weights / torch.where(total > 0, total, 1.0)
        eps = self.label_smoothing
        pair_losses = (1 - eps) * F.softplus(-margin) + eps * F.softplus(margin)
        valid = pairs.any(dim=1)  # (B,) P non-empty
        losses = (weights * pair_losses).sum(dim=1) * valid
        loss = losses.sum() / valid.sum().clamp(min=1)
        metrics = self._metrics(inputs.policy, s.detach(), margin.detach(), psi, tau, pairs, valid)
        return ObjectiveOutput(loss=loss, losses=losses, metrics=metrics)

    @staticmethod
    def _metrics(policy, s, margin, psi, tau, pairs, valid) -> dict[str, torch.Tensor]:
        k = psi.shape[1]
        top = psi.argmax(dim=1, keepdim=True)  # first best item
        bottom = k - 1 - psi.flip(1).argmin(dim=1, keepdim=True)  # last worst item
        logps = policy.detach().float()
        pairs, valid = pairs.float(), valid.float()
        n_pairs = pairs.sum(dim=1)  # (B,)
        kendall = (torch.sign(margin) * pairs).sum(dim=1) / n_pairs.clamp(min=1)
        return {
            "rewards/chosen": _mean_over(s.gather(1, top)[:, 0], valid),
            "rewards/rejected": _mean_over(s.gather(1, bottom)[:, 0], valid),
            "rewards/margins": _mean_over(margin, pairs),
            "rewards/accuracies": _mean_over((margin > 0).float(), pairs),
            "logps/top": _mean_over(logps.gather(1, top)[:, 0], valid),
            "logps/bottom": _mean_over(logps.gather(1, bottom)[:, 0], valid),
            "rank/ndcg": _mean_over(ndcg(psi, tau), valid),
            "rank/kendall_tau": _mean_over(kendall, valid),
            "rank/valid_pairs": n_pairs.sum(),
            "rank/valid_prompts": valid.sum(),
        }
