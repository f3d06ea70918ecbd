"""``model.compile``: ``torch.compile`` of the mask-free blocks of every decoder layer.

A decoder layer of a small model launches dozens of tiny kernels per token block (RMSNorm
alone is a power, a mean, an add, a reciprocal square root and two products, each a kernel and
each with its backward); on a GPU such a step waits on the host, not on the matmuls. Compiling
fuses them. What is compiled: each direct child of a decoder layer whose ``forward`` takes one
tensor (LFM2: ``operator_norm``, ``ffn_norm`` and the SwiGLU ``feed_forward``; Llama-style
models: the two norms and the MLP), with dynamic shapes, so a new sequence length or batch size
does not recompile. The attention and LFM2's short convolutions take masks, caches and
positions, which change form between training, packed scoring and cached decoding; they stay
eager, as does everything outside the layers (embeddings, final norm, LM head).

Compiled blocks compute what the eager ones do, within floating-point tolerance (inductor
fuses and reorders reductions; tests/test_compile.py checks log-probs and gradients). The
state dict is unchanged (``nn.Module.compile`` compiles in place), so checkpoints and exports
are those of an eager run, and a ``deepcopy`` (the frozen reference) runs its own blocks.
"""

from __future__ import annotations

import inspect

import torch


def _one_tensor_forward(module: torch.nn.Module) -> bool:
    """``module.forward`` takes exactly one positional argument and nothing else."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers model (its ``_no_split_modules`` classes, as FSDP
    wraps them), found through PEFT and ptlight wrappers alike."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile the one-tensor children of every decoder layer of ``model`` in place; returns
    how many blocks were compiled (0: no decoder layer found, the model runs eager).
    Idempotent."""
    count = 0
    for layer in decoder_layers(model):
        for block in layer.children():
            if _one_tensor_forward(block):
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile(dynamic=True)
                count += 1
    model._ptl_compiled = count > 0
    return count


def is_compiled(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_ptl_compiled", False))
