"""Objective base class and the typed inputs objectives consume.

An objective is a small ``torch.nn.Module``: hyperparameters in ``__init__`` (keywords only),
tensors in, :class:`ObjectiveOutput` out. It never sees the model, the config tree or the data
loader; the method that drives it computes log-probs and hands them over in one of the input
dataclasses below. State that must survive a checkpoint (running means, ...) lives in buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

DATA_KINDS = ("sft", "pairwise", "listwise", "unpaired", "rollout", "scores", "group")


@dataclass
class ObjectiveOutput:
    """What every objective returns.

    loss:    0-dim tensor, the quantity to minimise (batch mean of ``losses`` unless the
             objective documents otherwise).
    losses:  ``[B]`` per-example losses (detached or not; used for logging and tests).
    metrics: name -> 0-dim tensor, logged as ``train/<name>`` / ``val/<name>``. Names follow TRL.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Logps:
    """Sequence-level log-probabilities, what preference objectives consume.

    policy:       ``[B, K]`` summed completion log-probs under the policy. K=2 for pairs (column 0
                  chosen, column 1 rejected); K>2 listwise, columns ordered best first; K=1 unpaired.
    reference:    ``[B, K]`` the same under the reference model, or ``None`` when reference-free.
    lengths:      ``[B, K]`` completion token counts.
    labels:       ``[B]`` bool, desirable/undesirable (unpaired data only).
    kl_policy:    ``[B]`` log-probs of mismatched prompt/completion pairs (KTO's reference point).
    kl_reference: ``[B]`` the same under the reference.
    scores:       ``[B, K]`` optional graded ratings (ties allowed).
    chosen_nll:   ``[B]`` mean token NLL of column 0 under the policy (ORPO-style objectives).
    """

    policy: torch.Tensor
    reference: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    kl_policy: torch.Tensor | None = None
    kl_reference: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None


@dataclass
class TokenLogps:
    """Token-level inputs for supervised objectives (``data_kind = "sft"``).

    logps:     ``[B, T]`` log-prob of each target token under the policy (fp32); 0 where masked.
    mask:      ``[B, T]`` bool, True on completion tokens that carry a label (final EOS included).
    mean_logp: ``[B, T]`` mean over the vocabulary of log p (for label smoothing), or ``None``.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    mean_logp: torch.Tensor | None = None


@dataclass
class Rollout:
    """Token-level tensors of a PPO rollout, all ``[B, T]`` over response tokens.

    logps / old_logps: log-probs of the sampled tokens now and at rollout time.
    values / old_values: value-head predictions now and at rollout time.
    advantages, returns: from GAE at rollout time.
    mask: bool, True on valid response tokens.
    """

    logps: torch.Tensor
    old_logps: torch.Tensor
    values: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor


@dataclass
class Rewards:
    """Scalar rewards of K completions per prompt, what reward-model objectives consume
    (``data_kind = "scores"``).

    rewards: ``[B, K]`` the reward model's outputs; K=2 for pairs (column 0 chosen), K>2 for
             listwise data (columns ordered best first).
    scores:  ``[B, K]`` graded ratings of listwise data (higher = better, ties allowed), or
             ``None``: then the columns are strictly ordered best first.
    margins: ``[B]`` per-pair margin m (pairwise data with a ``margin`` column), or ``None``.
    lengths: ``[B, K]`` completion token counts (for the ``num_tokens`` metric), or ``None``.
    """

    rewards: torch.Tensor
    scores: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


@dataclass
class GroupRollout:
    """Token-level tensors of G sampled completions per prompt, what the critic-free RL
    objectives consume (``data_kind = "group"``: grpo, rloo, reinforce_pp, online_dpo).

    The completions of one prompt are contiguous rows: B = prompts × G.

    logps:       ``[B, T]`` log-probs of the completion tokens under the current policy (with
                 grad, fp32); 0 where masked.
    mask:        ``[B, T]`` bool, True on completion tokens (up to and including the first EOS).
    group_size:  G, completions per prompt.
    advantages:  ``[B]`` (or ``[B, T]``) from the objective's ``advantages()`` at rollout time;
                 ``None`` for objectives that do not use them (online_dpo).
    old_logps:   ``[B, T]`` log-probs at rollout time, or ``None`` for one update per rollout
                 (μ = 1): then ``logps.detach()`` stands in and every ratio is exactly 1.
    ref_logps:   ``[B, T]`` reference-model log-probs (needed when beta > 0, and by online_dpo).
    rewards:     ``[B]`` per-completion rewards, NaN = unscorable (online_dpo picks chosen and
                 rejected from them).
    max_completion_length: the generation limit, dr_grpo's constant denominator.
    num_items_in_batch: dapo's denominator: the active tokens of the whole generation batch over
                 all ranks (TRL's name); ``None`` uses this batch's ``mask.sum()``. The loss is
                 divided by exactly this number; TRL divides by it / world size (× accumulation
                 steps / steps per generation) because DDP averages gradients over ranks, so a
                 method that wants TRL's gradient passes that quotient.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    group_size: int
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    max_completion_length: int | None = None
    num_items_in_batch: float | torch.Tensor | None = None


class Objective(torch.nn.Module):
    """Base class of every objective (built-in or third-party).

    Subclasses set the class attributes and implement :meth:`forward`. Hyperparameters are
    keyword-only ``__init__`` arguments; their names follow TRL where TRL has the same thing.
    ``needs_reference`` is a class attribute (its value at the default hyperparameters) that an
    instance may override from its own (grpo: ``beta > 0``); the pipeline reads it from the
    built instance.
    """

    name: ClassVar[str] = ""
    needs_reference: bool = False
    data_kind: ClassVar[str] = ""
    # per-token quantities the objective needs instead of sequence sums (names in
    # ptlight.objectives.tokens.TOKEN_TERMS); non-empty: forward receives a TokenTerms
    token_terms: ClassVar[tuple[str, ...]] = ()

    def forward(self, inputs):  # noqa: D102 - documented on subclasses
        raise NotImplementedError

    def bind_hidden_size(self, hidden_size: int) -> None:
        """Called once with the policy's hidden size, before the optimiser is built, by a
        method that hands this objective ``hidden`` token terms: an objective with layers
        over hidden states (SparsePO's learnable masks) creates them here. Default: nothing."""


def sigmoid_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's shared pairwise metrics from per-pair implicit rewards (already scaled by beta)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": policy[:, 0].detach().mean(),
        "logps/rejected": policy[:, 1].detach().mean(),
    }
