"""``model.compile``: ``torch.compile`` of every decoder layer's mask-free blocks, and of whole
layers in ptlight's packed scoring.

A decoder layer of a small model launches dozens of tiny kernels per token block (RMSNorm
alone is a power, a mean, an add, a reciprocal square root and two products, each a kernel and
each with its backward); on a GPU such a step waits on the host, not on the matmuls. Compiling
fuses them. What is compiled: each direct child of a decoder layer whose ``forward`` takes one
tensor (LFM2: ``operator_norm``, ``ffn_norm`` and the SwiGLU ``feed_forward``; Llama-style
models: the two norms and the MLP), with dynamic shapes, so a new sequence length or batch size
does not recompile. The attention and LFM2's short convolutions take masks, caches and
positions, which change form between training, packed scoring and cached decoding; they stay
eager, as does everything outside the layers (embeddings, final norm, LM head).

Packed scoring (:func:`ptlight.engine.packing.packed_hidden`, the preference methods' fast path)
always calls the layers the same way — a boolean tree mask for attention, a
:class:`~ptlight.engine.packing.ConvChain` for the convolutions, no cache — so there the whole
layer is compiled too (attention projections, rotary and q/k norms, the convolution's gathers,
the residual adds): such calls carry the ``ptlight_packed`` keyword, which each layer's
forward (:func:`_layer_forward`) takes off and answers with its compiled self. One graph per
layer kind and grad mode; a new packed width does not recompile. With gradient checkpointing
the layers keep the blocks-only compile: the recompute's ``context_fn`` (ptlight's CPU bf16
re-entry) is not one dynamo can trace.

``model.compile=packed`` compiles the packed scoring calls' whole layers only: the training
step of a packed preference run is the same compiled step, while generation (evaluation,
sampling) and padded scoring stay eager and never wait on a compile.

``model.compile_mode`` is ``torch.compile``'s ``mode`` for all of it. ``reduce-overhead`` adds
CUDA graphs (torch's cudagraph trees): each compiled layer replays its recorded kernels, so the
host launches one graph per layer and shape instead of each kernel; a new packed shape is
recorded once (packed widths come in steps of ``method.pack_multiple_of``, so shapes repeat).
On the CPU there are no CUDA graphs and the mode compiles as ``default`` does.

CUDA graphs and calls without gradients: cudagraph trees start a new generation at every call
of a compiled function that no pending backward holds in the current one, and a new generation
may reuse the memory of the last one's outputs. A training step's compiled calls all wait on
its backward, so they stay in one generation. A call with gradients disabled (the reference's
precompute, a live reference's scoring, evaluation, generation) waits on none: layer i+1's graph
would overwrite layer i's output while it is still the input (torch raises "accessing tensor
output of CUDAGraphs that has been overwritten by a subsequent run"). In the modes that record
graphs (:data:`GRAPH_MODES`), such a call's tensors are cloned out of the graph's memory
(:func:`_outputs_kept`), the remedy torch's message names; a call with gradients returns them
as they are.

Compiled blocks compute what the eager ones do, within floating-point tolerance (inductor
fuses and reorders reductions; tests/test_compile.py checks log-probs and gradients). The
state dict is unchanged (``nn.Module.compile`` compiles in place), so checkpoints and exports
are those of an eager run, and a ``deepcopy`` (the frozen reference) runs its own blocks.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

PACKED_CALL = "ptlight_packed"  # keyword of a packed scoring call (ptlight.engine.packing)
# torch.compile's modes, as model.compile_mode takes them
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs


def _outputs_kept(fn: Any) -> Any:
    """``fn`` (a compiled call in a :data:`GRAPH_MODES` mode), its tensors cloned when the call
    runs without gradients (see the module doc); returned as they are otherwise. On the CPU,
    where these modes record no graphs, the clones are the same values in other memory."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if torch.is_grad_enabled():
            return out
        return tree_map_only(torch.Tensor, torch.Tensor.clone, out)

    return call


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


def _layer_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward: compiled whole for a packed scoring call, as before (with its
    compiled blocks) for anything else. The compiled function is made per module on first
    use and remembers which module it belongs to, so a ``deepcopy`` (the frozen reference)
    compiles its own instead of running the original's."""
    if not kwargs.pop(PACKED_CALL, False):
        return type(self).forward(self, *args, **kwargs)
    owner, compiled = self.__dict__.get("_ptl_packed_forward", (None, None))
    if owner != id(self):
        mode = self.__dict__.get("_ptl_compile_mode")
        compiled = torch.compile(type(self).forward.__get__(self), dynamic=True, mode=mode)
        if mode in GRAPH_MODES:
            compiled = _outputs_kept(compiled)
        self.__dict__["_ptl_packed_forward"] = (id(self), compiled)
    return compiled(*args, **kwargs)


def compile_blocks(model: torch.nn.Module, blocks: bool = True, mode: str = "default") -> int:
    """Compile the one-tensor children of every decoder layer of ``model`` in place, and the
    whole layer for packed scoring calls (not under gradient checkpointing); returns how many
    blocks and packed layers were set to compile (0: no decoder layer found, the model runs
    eager). ``blocks=False`` (``model.compile=packed``): packed scoring calls only, so every
    other call — padded scoring, generation — runs eager and compiles nothing. ``mode``:
    ``torch.compile``'s (:data:`MODES`). Idempotent."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: use one of {', '.join(MODES)}")
    torch_mode = None if mode == "default" else mode
    count = 0
    for layer in decoder_layers(model):
        for block in layer.children() if blocks else ():
            if _one_tensor_forward(block):
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile(dynamic=True, mode=torch_mode)
                    if mode in GRAPH_MODES:
                        block._compiled_call_impl = _outputs_kept(block._compiled_call_impl)
                count += 1
        if not getattr(layer, "gradient_checkpointing", False):
            layer.forward = types.MethodType(_layer_forward, layer)
            layer.__dict__["_ptl_compile_mode"] = torch_mode
            count += not blocks
    model._ptl_compiled = count > 0
    return count


def is_compiled(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_ptl_compiled", False))
