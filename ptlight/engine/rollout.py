"""Rollout engines: how RL methods sample completions from the policy.

Generation is the bottleneck of every RL method, so it sits behind one small interface,
:class:`RolloutEngine`, picked by name (``method.rollout.engine``) from the entry-point group
``ptlight.rollout_engines``. ptlight ships :class:`HFGenerate` (``hf``): transformers'
``generate`` on the policy itself — batched, with the KV cache (LFM2's conv state included),
every row of the batch decoded together, stopping as soon as every sequence has emitted EOS.
An engine that serves the weights elsewhere (vLLM, SGLang) implements :meth:`generate` and
:meth:`sync_weights`, which the method calls after every optimiser step that changed the
weights, and registers itself as a third-party plugin::

    [project.entry-points."ptlight.rollout_engines"]
    vllm = "my_package.engines:VLLMEngine"

The engine returns a :class:`Generation`: token ids and masks of the ``prompts × n`` sampled
completions (the ``n`` samples of one prompt are contiguous rows), cut after their first EOS,
plus the wall time and count of generated tokens, from which the method reports rollout
tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel

from ptlight.errors import ConfigError
from ptlight.model.backbone import eval_mode


@dataclass
class Generation:
    """``N = prompts × n`` sampled completions, rows of one prompt contiguous.

    sequences:       ``[N, P + C]`` left-padded prompt then completion; completion tokens after
                     the first EOS are the pad token.
    attention_mask:  ``[N, P + C]`` 1 on real prompt tokens and on completion tokens up to and
                     including the first EOS.
    completion_mask: ``[N, C]`` bool, the completion part of ``attention_mask``.
    has_eos:         ``[N]`` bool: the completion ended with EOS (False: cut at the length cap).
    n_prompt:        P, the padded prompt width.
    seconds:         wall time of the generation.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    has_eos: torch.Tensor
    n_prompt: int
    seconds: float

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.n_prompt:]

    @property
    def num_tokens(self) -> int:
        """Generated tokens that count (up to and including EOS)."""
        return int(self.completion_mask.sum())


def completion_mask(completions: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N, C]`` bool mask of each completion up to and including its first EOS, ``[N]`` bool
    whether it has an EOS at all)."""
    is_eos = completions == eos_id
    seen_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return ~seen_before, is_eos.any(dim=1)


def finish(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
           n: int, eos_id: int, pad_id: int, seconds: float) -> Generation:
    """A :class:`Generation` from the prompts and the raw sampled tokens (``[N, C]``, rows of one
    prompt contiguous): cut after the first EOS, masks built."""
    mask, has_eos = completion_mask(completions, eos_id)
    ids = prompt_ids.repeat_interleave(n, dim=0)
    attn = prompt_mask.repeat_interleave(n, dim=0)
    seqs = torch.cat([ids, completions.masked_fill(~mask, pad_id)], dim=1)
    return Generation(sequences=seqs, attention_mask=torch.cat([attn, mask.long()], dim=1),
                      completion_mask=mask, has_eos=has_eos, n_prompt=prompt_ids.shape[1],
                      seconds=seconds)


class RolloutEngine:
    """Base class of rollout engines (group ``ptlight.rollout_engines``). Settings are
    keyword-only ``__init__`` arguments (``method.rollout.engine_args``)."""

    name: ClassVar[str] = ""

    def generate(self, model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, eos_token_id: int,
                 pad_token_id: int, synced_gpus: bool = False) -> Generation:
        """Sample ``n`` completions for each left-padded prompt row (``temperature`` 0:
        greedy); ``top_k`` 0 and ``top_p`` 1.0 turn those filters off."""
        raise NotImplementedError

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Called after each optimiser step: an engine that holds its own copy of the weights
        reloads them from ``model``. The default (the policy generates itself) does nothing."""


class HFGenerate(RolloutEngine):
    """transformers' ``generate`` on the policy, in eval mode, with its KV cache.

    ``cache_implementation``: None (the model's own cache: LFM2's hybrid conv/attention
    cache) or a transformers cache name such as ``"static"``: fixed shapes, with which
    transformers compiles the decode step on CUDA (CUDA graphs). The setting is passed through
    to ``generate``; a model whose cache has no such form gets transformers' error.
    """

    name = "hf"

    def __init__(self, *, cache_implementation: str | None = None) -> None:
        self.cache_implementation = cache_implementation

    def generate(self, model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, *, n: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, eos_token_id: int,
                 pad_token_id: int, synced_gpus: bool = False) -> Generation:
        extra: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
            if temperature > 0 else {"do_sample": False})
        if self.cache_implementation:
            extra["cache_implementation"] = self.cache_implementation
        started = time.perf_counter()
        with eval_mode(model):
            out = model.generate(  # the n samples of a prompt: n contiguous copies of its row
                input_ids=input_ids.repeat_interleave(n, dim=0),
                attention_mask=attention_mask.repeat_interleave(n, dim=0),
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, synced_gpus=synced_gpus, **extra)
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        seconds = time.perf_counter() - started
        return finish(input_ids, attention_mask, out[:, input_ids.shape[1]:], n, eos_token_id,
                      pad_token_id, seconds)


def build_engine(settings: Any, key: str = "method.rollout") -> RolloutEngine:
    """The rollout engine ``<key>.engine`` with its settings ``<key>.engine_args``."""
    from ptlight.registry import ROLLOUT_ENGINES

    try:
        ROLLOUT_ENGINES.load(settings.engine)
    except KeyError as exc:
        raise ConfigError(f"{key}.engine: {exc.args[0]}") from None
    args = settings.get("engine_args")
    args = OmegaConf.to_container(args, resolve=True) if OmegaConf.is_config(args) else args
    return ROLLOUT_ENGINES.build(settings.engine, dict(args or {}), f"{key}.engine_args")
