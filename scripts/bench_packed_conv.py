"""Packed LFM2 short convolution: ptlight's chain convolution against the plain path's conv1d.

    python scripts/bench_packed_conv.py                      # CPU, fp32 and bf16
    python scripts/bench_packed_conv.py --device cuda        # a GPU (bf16)

A packed row convolves each token with its predecessors along its own sequence (its prompt,
then its branch), not with the previous columns of the row
(:func:`ptlight.engine.packing.tree_conv`). This times one convolution's forward + backward
per layer at a packed row's shapes ``[R, N, D]`` (channels last, as LFM2's projections give
them), with a group start every 512 tokens and a branch every 256, for:

- ``chain``: :func:`~ptlight.engine.packing.tree_conv` as the packed forward runs it (one
  row gather and one fused multiply-add per tap, tap indices from
  :func:`~ptlight.engine.packing.chain_taps`; the gathers' backward gathers too, through
  :func:`~ptlight.engine.packing.tap_readers`, built once per forward for every layer and
  timed on its own as ``readers``);
- ``chain, scatter``: the same with the gathers' stock backward (``index_add``: atomic adds
  on a GPU);
- ``gather``: the per-element formulation it replaced (``gather`` along the token axis of
  ``[R, D, N]`` with the index expanded over channels, one tap at a time), kept here as the
  baseline;
- ``conv1d``: ``torch.nn.functional.conv1d`` over the whole row, what the unpacked path
  runs (not usable on packed rows: it mixes neighbouring sequences), for scale.

Prints the median milliseconds of ``--repeats`` timed calls after 3 warm-up calls, and checks
that ``chain`` and ``gather`` agree, and that both ``chain`` backwards give the same gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ptlight.engine.packing import chain_taps, tap_readers, tree_conv


def gather_conv(x_rdn: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """The per-element gather formulation, ``x``: ``[R, D, N]``."""
    r, d, n = x_rdn.shape
    k = weight.shape[-1]
    padded = torch.cat([x_rdn, x_rdn.new_zeros(r, d, 1)], dim=-1)
    out = x_rdn * weight[:, k - 1, None].to(x_rdn.dtype)
    chain = prev.masked_fill(prev < 0, n)
    prev_ext = torch.cat([chain, chain.new_full((r, 1), n)], dim=-1)
    idx = chain
    for tap in range(k - 2, -1, -1):
        out = out + padded.gather(-1, idx[:, None, :].expand(r, d, n)) * weight[:, tap, None].to(
            x_rdn.dtype)
        idx = prev_ext.gather(-1, idx)
    return out + bias[:, None].to(x_rdn.dtype)


def chain_prev(r: int, n: int, device: str) -> torch.Tensor:
    prev = torch.arange(-1, n - 1, device=device).repeat(r, 1)
    prev[:, ::512] = -1  # a group starts
    prev[:, 256::512] = torch.arange(128, n, 512, device=device)[: prev[:, 256::512].shape[1]]
    return prev  # a second branch leaves its prompt at column 128 of its group


def timed(fn, device: str, repeats: int) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(3):
        once()
    return statistics.median(once() for _ in range(repeats)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default="2x1024x512,4x2048x1024,4x2048x2048",
                   help="comma list of RxNxD (rows, tokens per row, channels)")
    p.add_argument("--dtypes", default=None, help="default: float32,bfloat16 (CPU), bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    dtypes = (args.dtypes or ("float32,bfloat16" if args.device == "cpu" else "bfloat16"))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    print("| R×N×D | dtype | chain ms | chain, scatter ms | readers ms | gather ms | conv1d ms "
          "| gather ÷ chain |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        r, n, d = map(int, shape.split("x"))
        prev = chain_prev(r, n, args.device)
        taps = chain_taps(prev, 3)
        readers = tap_readers(taps, 2)  # chain_prev branches in two
        w = torch.randn(d, 3, device=args.device)
        b = torch.randn(d, device=args.device)
        for name in dtypes.split(","):
            dtype = getattr(torch, name)
            x = torch.randn(r, n, d, device=args.device, dtype=dtype, requires_grad=True)
            want = gather_conv(x.detach().float().mT, prev, w, b).mT
            got = tree_conv(x.detach().float(), taps, w, b)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

            grads = []
            for tap_grads in (None, readers):
                x.grad = None
                tree_conv(x, taps, w, b, tap_grads).float().sum().backward()
                grads.append(x.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)

            def run(f):
                return lambda: f().float().sum().backward()

            ms = {
                "chain": timed(run(lambda: tree_conv(x, taps, w, b, readers)), args.device,
                               args.repeats),
                "scatter": timed(run(lambda: tree_conv(x, taps, w, b)), args.device,
                                 args.repeats),
                "readers": timed(lambda: tap_readers(taps, 2), args.device, args.repeats),
                "gather": timed(run(lambda: gather_conv(x.mT, prev, w, b)), args.device,
                                args.repeats),
                "conv1d": timed(run(lambda: F.conv1d(x.mT, w[:, None].to(dtype), b.to(dtype),
                                                     padding=2, groups=d)[..., :n]),
                                args.device, args.repeats),
            }
            print(f"| {shape} | {name} | {ms['chain']:.2f} | {ms['scatter']:.2f} | "
                  f"{ms['readers']:.2f} | {ms['gather']:.2f} | {ms['conv1d']:.2f} | "
                  f"{ms['gather'] / ms['chain']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
