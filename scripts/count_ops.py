"""Count the aten ops one DPO policy step dispatches (forward + backward), and the norms' share.

    python scripts/count_ops.py                      # LFM2-350M layer layout, packed, bf16 autocast
    python scripts/count_ops.py --padded --precision fp32

On a GPU an eager step of a small model can wait on the host, which dispatches every op and
launches a kernel for each that computes; how many ops a step dispatches is therefore part of
its speed there, and it does not depend on the device or on the model's width. This counts
them on the CPU, for the layer layout of a ``scripts/bench_dpo.py`` fixture at a small width
(the count is the same at any width): 16 pairs of a 300-token prompt and two 80-token
completions, scored as ptlight's DPO step scores the policy with a precomputed reference
(``completion_logps``, packed unless ``--padded``), then the DPO loss and its backward.

It prints the total, the ops that compute (every op but views and metadata changes such as
``view``, ``t``, ``expand``, ``detach``: an estimate of kernel launches on CUDA), the most
frequent ops, and what the model's RMSNorm layers account for: the ops one stock norm
dispatches, and the step's count again with every norm replaced by a stand-in that dispatches
one op forward and one backward. That is the count of ``model.fused_norm=true`` on CUDA, where
each norm is torch's ``_fused_rms_norm`` forward and ``_fused_rms_norm_backward``; it cannot
be counted directly on the CPU, where ``F.rms_norm`` decomposes into the stock ops. Then,
on top of those stand-ins, the step as a CUDA training run sets up its layers: with the lean
MLP (``ptlight.engine.lean``), and with ``model.fuse_projections`` as well.
"""

from __future__ import annotations

import argparse
import collections
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402  (fixture layouts)

# ops that change metadata only (no kernel on CUDA)
VIEWS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.expand", "aten.slice",
    "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.as_strided",
    "aten.permute", "aten.alias", "aten.split", "aten.split_with_sizes", "aten.unbind",
    "aten.chunk", "aten.reshape", "aten._reshape_alias", "aten.lift_fresh", "aten.numpy_T",
})


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def computing(ops: collections.Counter) -> int:
    return sum(n for op, n in ops.items() if op not in VIEWS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", default="lfm2-350m", choices=sorted(bench_dpo.FIXTURES))
    p.add_argument("--width", type=int, default=64,
                   help="hidden size used (the op count does not depend on it)")
    p.add_argument("--precision", choices=["bf16-mixed", "fp32"], default="bf16-mixed")
    p.add_argument("--padded", action="store_true", help="score padded rows, not packed ones")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from ptlight.engine.logps import completion_logps
    from ptlight.engine.packing import pack_checked

    arch = dict(bench_dpo.FIXTURES[args.fixture]["arch"])
    heads = arch["num_attention_heads"]
    arch.update(hidden_size=args.width, intermediate_size=2 * args.width, vocab_size=4096,
                num_attention_heads=4, num_key_value_heads=max(1, 4 * arch.get(
                    "num_key_value_heads", heads) // heads))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("lfm2", **arch),
                                             attn_implementation="sdpa")
    pairs, prompt_len, completion_len = 16, 300, 80
    prompt = torch.randint(5, 4000, (pairs, prompt_len))
    ids = torch.cat([torch.cat([prompt, torch.randint(5, 4000, (pairs, completion_len))], 1)
                     for _ in range(2)])
    attn, loss_mask = torch.ones_like(ids), torch.zeros_like(ids)
    loss_mask[:, prompt_len:] = 1
    packed = None if args.padded else pack_checked(ids, attn, loss_mask, 2, 2048, 128)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            scores = completion_logps(model, ids, attn, loss_mask,
                                      pack=None if args.padded else 2, packed=packed)
            sums = scores.sequence_sum()
            loss = -F.logsigmoid(0.1 * (sums[:pairs] - sums[pairs:])).mean()
        loss.backward()

    step()  # first call: lazy initialisation out of the count
    model.zero_grad()
    with Count() as counted:
        step()

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    model.zero_grad()  # as in a step: gradients are new, not accumulated
    x = torch.randn(8, args.width, requires_grad=True)
    with Count() as one:
        with autocast:
            out = norms[0](x)
        out.backward(torch.ones_like(out))
    one.ops.subtract({"aten.ones_like": 1})
    # the same step with every norm dispatching one op forward and one backward, as torch's
    # fused kernels do on CUDA (a stand-in with their op count, not their function)
    for norm in norms:
        norm.forward = types.MethodType(lambda self, h: h * 1.0, norm)
    model.zero_grad()
    with Count() as fused:
        step()

    # then the layers of a CUDA training step as ptlight.train sets them up: the lean MLP (which
    # CUDA autocast takes; CPU autocast is let take it here) and model.fuse_projections
    import ptlight.engine.lean as lean
    from ptlight.engine.fused_proj import install_fused_projections

    lean.AUTOCAST_DEVICES = ("cuda", "cpu")
    lean.install_lean_mlp(model)
    model.zero_grad()
    with Count() as leaned:
        step()
    install_fused_projections(model)
    model.zero_grad()
    with Count() as fused_proj:
        step()

    total, compute = sum(counted.ops.values()), computing(counted.ops)
    print(f"fixture {args.fixture} layout ({arch['num_hidden_layers']} layers), "
          f"{'padded' if args.padded else 'packed'}, {args.precision}, torch {torch.__version__}")
    print(f"ops dispatched per step: {total}; ops that compute: {compute}")
    print(f"RMSNorm layers: {len(norms)}; one stock norm forward + backward: "
          f"{sum(one.ops.values())} ops, {computing(one.ops)} that compute")
    print(f"with each norm one op forward and one backward (the count of torch's fused "
          f"kernels on CUDA): {sum(fused.ops.values())} ops, {computing(fused.ops)} that compute "
          f"({100 * (1 - computing(fused.ops) / compute):.0f}% fewer)")
    print(f"+ the lean MLP (as on CUDA): {sum(leaned.ops.values())} ops, "
          f"{computing(leaned.ops)} that compute")
    print(f"+ model.fuse_projections (q/k/v and w1/w3 as one matmul each): "
          f"{sum(fused_proj.ops.values())} ops, {computing(fused_proj.ops)} that compute "
          f"({100 * (1 - computing(fused_proj.ops) / computing(leaned.ops)):.0f}% fewer than "
          f"the line above)")
    if args.top:
        print("most frequent ops:")
    for op, n in counted.ops.most_common(args.top):
        print(f"  {n:6d}  {op}{'  (view)' if op in VIEWS else ''}")


if __name__ == "__main__":
    main()
