"""``model.fused_norm``: RMSNorm layers as torch's ``F.rms_norm``, one kernel each way on CUDA.

The transformers RMSNorm of LFM2 (and of Llama, Mistral, Qwen2/3, which share its definition)
is written out in tensor ops: ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` with
``x32 = x.float()``. Eagerly that is six ops forward and about fourteen backward per norm, each
a kernel on a GPU; LFM2-350M has 45 norms (two per layer, the q/k norms of its 6 attention
layers, the final one). ``scripts/count_ops.py`` counts a packed bf16-mixed DPO step of that
layout at 2,501 ops that compute; with every norm dispatching one op each way, as the fused
kernels below do, 1,655 (34% fewer). Where a small model's step waits on the host rather than
on its matmuls (the first GPU profile of issue 15), launches saved are step time.

``F.rms_norm`` computes the same function. On CUDA it runs torch's fused kernels
(``_fused_rms_norm`` forward, ``_fused_rms_norm_backward`` for both gradients) when the input
and the weight share a dtype. Under CUDA autocast (``bf16-mixed``) the input of a norm is often
bf16 (LFM2's q/k norms take a projection's output) while the weight is fp32; the fused kernel
would refuse that pair and the call would fall back to a decomposition. So under CUDA autocast
the norm runs in fp32, input and weight upcast (what autocast's own fp32 policy for
``rms_norm`` does in the torch releases that list it; torch 2.11 does not), and returns the
dtype the stock layer returns (the promotion of the weight's and the input's dtypes).
Elsewhere it decomposes into ops like the stock layer's: on the CPU there is nothing to gain,
and in fp32 nothing changes (log-probs and gradients are bitwise the stock layer's;
``tests/test_norms.py``); with bf16 weights it multiplies the weight before rounding to bf16,
one rounding fewer than the stock layer.

Equal within floating-point tolerance, not bitwise, where the fused kernel runs: it reduces in
its own order, and it multiplies the weight in fp32 where the stock layer first rounds the
normalised value to the input's dtype. Calls the fused path would not serve are left to the
stock forward: mixed input/weight dtypes without CUDA autocast (QLoRA's fp32 norms on bf16
inputs, CPU autocast), where ``F.rms_norm`` would fall back to its decomposition and return the
input's dtype instead of the stock layer's promoted one.

``model.fused_norm=auto`` (the default) is on where the run trains on CUDA, where it was
measured faster and leaner (``scripts/bench_gpu.py``; docs/performance.md has the figures), and
off on the CPU, whose step is not launch-bound and whose results stay those of the stock layers.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# transformers RMSNorm classes whose forward is exactly the stock definition above (weight
# multiplied as is, not ``1 + weight`` as Gemma's is; epsilon in ``variance_epsilon``)
RMSNORM_CLASSES = frozenset({
    "Lfm2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
})


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if hidden_states.is_cuda and torch.is_autocast_enabled("cuda"):
        out = F.rms_norm(hidden_states.float(), weight.shape, weight.float(),
                         self.variance_epsilon)
        return out.to(torch.promote_types(weight.dtype, hidden_states.dtype))
    if hidden_states.dtype == weight.dtype:
        return F.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def install_fused_norms(model: torch.nn.Module) -> int:
    """Route every RMSNorm of a known form in ``model`` (:data:`RMSNORM_CLASSES`) through
    ``F.rms_norm``; returns how many (0: none of a known form, the model is unchanged).
    Idempotent; set on the instances, so other models in the process are untouched and a
    ``deepcopy`` (the frozen reference) carries it."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in RMSNORM_CLASSES and hasattr(m, "variance_epsilon"):
            if not getattr(m, "_ptl_fused_norm", False):
                m.forward = types.MethodType(_fused_forward, m)
                m._ptl_fused_norm = True
            n += 1
    return n
