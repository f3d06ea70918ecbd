"""KTO: Kahneman–Tversky optimisation on unpaired desirable/undesirable completions
(Ethayarajh et al. 2024, arXiv 2402.01306; TRL ``KTOTrainer(loss_type="kto")``).

    r = S_θ(y) − S_ref(y)
    z₀ = max(0, mean_j [S_θ(y'_j) − S_ref(y'_j)])       (no gradient)
    desirable:   λ_D·(1 − σ(β·(r − z₀)))
    undesirable: λ_U·(1 − σ(β·(z₀ − r)))
    L = mean over all items of the batch

y'_j is a mismatched completion for prompt x_j (the method pairs x_j with y_{j−1}, cyclic), given
as ``Logps.kl_policy`` / ``kl_reference``. z₀ estimates KL(π_θ‖π_ref) and is the reference point of
the value function. A class absent from the batch simply contributes no items: no NaN. The paper
advises λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]; the ratio is a data/config matter and is not enforced here.
There is no κ temperature: the temperature is β. At initialisation (r = z₀ = 0) the loss is 0.5·λ.

Deliberate exception to purity: when ``torch.distributed`` is initialised, the sum and count of
the mismatched log-ratios are all-reduced so that z₀ is the mean over the global batch, as in the
paper and TRL. Every rank must therefore call ``forward`` in lockstep (as DDP/FSDP training does).

Metrics: ``kl`` (= z₀); ``rewards/chosen`` / ``rewards/rejected`` are class means of β·r and
``logps/chosen`` / ``logps/rejected`` class means of S_θ(y), 0 for a class absent from the batch;
``count/chosen`` / ``count/rejected`` give the class sizes (TRL's names) so an absent class is
visible; ``rewards/margins`` is the difference of the class means, 0 unless both are present.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ptlight.objectives.base import Logps, Objective, ObjectiveOutput


def reference_point(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, global mean of kl_policy − kl_reference), detached; all-reduced across ranks."""
    with torch.no_grad():
        diff = kl_policy.detach().float() - kl_reference.detach().float()  # (B,)
        stats = torch.stack([diff.sum(), diff.new_full((), float(diff.numel()))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # sum of log-ratios and of counts over ranks
        return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)


def _class_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (not NaN) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


class KTO(Objective):
    """Prospect-theoretic loss on unpaired sequence log-probs (``Logps.policy`` ``[B, 1]``)."""

    name = "kto"
    needs_reference = True
    data_kind = "unpaired"

    def __init__(
        self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"kto: beta must be > 0, got {beta}")
        if desirable_weight <= 0:
            raise ValueError(f"kto: desirable_weight must be > 0, got {desirable_weight}")
        if undesirable_weight <= 0:
            raise ValueError(f"kto: undesirable_weight must be > 0, got {undesirable_weight}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        if inputs.reference is None:
            raise ValueError("kto needs reference log-probs (Logps.reference is None)")
        if inputs.labels is None:
            raise ValueError("kto needs desirable/undesirable labels (Logps.labels is None)")
        if inputs.kl_policy is None or inputs.kl_reference is None:
            raise ValueError("kto needs mismatched-pair log-probs (Logps.kl_policy/kl_reference)")
        if inputs.policy.dim() != 2 or inputs.policy.shape[1] != 1:
            raise ValueError(f"kto expects Logps.policy [B, 1], got {tuple(inputs.policy.shape)}")
        logps = inputs.policy.float()[:, 0]  # (B,)
        rho = logps - inputs.reference.float()[:, 0]
        z0 = reference_point(inputs.kl_policy, inputs.kl_reference)
        desirable = inputs.labels.reshape(-1).bool()  # (B,)
        gain = self.desirable_weight * (1 - torch.sigmoid(self.beta * (rho - z0)))
        loss_aversion = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - rho)))
        losses = torch.where(desirable, gain, loss_aversion)  # (B,)

        rewards = (self.beta * rho).detach()
        chosen, rejected = desirable.float(), (~desirable).float()
        reward_c, reward_r = _class_mean(rewards, chosen), _class_mean(rewards, rejected)
        both = (chosen.sum() > 0) & (rejected.sum() > 0)
        metrics = {
            "kl": z0,
            "rewards/chosen": reward_c,
            "rewards/rejected": reward_r,
            "rewards/margins": torch.where(both, reward_c - reward_r, torch.zeros_like(reward_c)),
            "logps/chosen": _class_mean(logps.detach(), chosen),
            "logps/rejected": _class_mean(logps.detach(), rejected),
            "count/chosen": chosen.sum(),
            "count/rejected": rejected.sum(),
        }
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics=metrics)
