"""DPO on a CUDA GPU: ptlight's shipped defaults (and variants) vs TRL's DPOTrainer, side by side.

    python scripts/bench_gpu.py --out bench_gpu_out                 # on one H100/H200, < 8 min
    python scripts/bench_gpu.py --device cpu --fixture tiny         # smoke test, seconds

Fixtures (built offline with ``scripts/bench_dpo.py``'s builder: random init saved with
``save_pretrained``, so both frameworks load the very same weights; pairwise rows of the
bundled sorting task behind a context, prompt + completion close to ``max_length``):

- ``gpu-350m``: the LFM2-350M shape (hidden 1024, FFN 4608, 16 layers, vocab 65536),
  16 pairs a batch, max_length 512;
- ``gpu-1.2b``: the LFM2-1.2B shape (hidden 2048, FFN 8192, 16 layers, vocab 65536),
  8 pairs a batch, max_length 512;
- ``tiny``: the 3-layer test model (smoke test).

Every run is its own process, which exits as soon as its steps are timed (no export,
checkpoint or teardown). Runs start in plan order while ``--budget`` seconds (default 420) have
not passed, and a run still going when ``--limit`` seconds (default 470) have passed is stopped
(listed as timed out), so the whole plan ends within 8 minutes; a run not started is listed as
skipped. ptlight runs ``train_stage`` with ``method=dpo`` (exactly what
``python -m ptlight method=dpo`` runs) on its defaults — ``default`` — plus the variants in
:data:`PTLIGHT_CONFIGS`, each bounded by one epoch over the fixture (a run that uses every
row, which the ``auto`` defaults are settled for; the process exits after its timed steps); TRL runs ``DPOTrainer`` in the configurations of
:data:`TRL_CONFIGS`. Same data, batch, max length, optimiser (AdamW lr 5e-5, betas 0.9/0.95,
cosine, clip 1.0), beta 0.1, bf16-mixed on the GPU (fp32 on the CPU).

``--profile N`` profiles N more steps of every ptlight run after its timed ones
(torch.profiler) into ``<out>/profile_<fixture>_<config>.txt``: GPU kernel time per step
against the wall time (how long the GPU waited on the host), kernel launches per step, and
the ops with the most self time; then N steps more with their Python calls recorded (which
slows the host, so none of the timings come from them), for which Python lines called the
scalar read-backs and where the ops' host time goes.

GEMM-bound MFU (per run): the run's FLOPs over the time its matmuls alone take on this device
at the run's own shapes (:func:`gemm_bound_s`: each decoder weight and the LM head, forward and
both backward products, over the tokens the run's body computes). Small models at small
batches run matmuls far from the 8192³ peak; this column says how much of an MFU target the
matmul shapes themselves allow, apart from everything the framework adds.

Measured per run: the median time between optimiser-step ends after ``--warmup`` steps (on
CUDA, between CUDA events recorded at each; nothing of the bench makes the host wait for the
GPU inside the run, and the batches' token counts are read once the steps are timed);
pairs/s, tokens/s (real tokens of the batch, padding not counted); peak allocated and
reserved CUDA memory of the process (``torch.cuda.max_memory_*``); MFU = model FLOPs per step
(``bench_dpo._flops``: 6·N·T for the policy, 2·N·T more when the reference runs live; T =
tokens the body runs) / step time / a bf16 matmul peak measured at the start (8192³ products
on this card); data MFU = the same with the usual count of model FLOPs
(``bench_dpo.data_flops``: N every parameter, T the tokens of both sequences of every pair,
whatever the run shares or skips). Writes ``<out>/bench_gpu.json`` and ``<out>/bench_gpu.md``
after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402  (fixture builder, FLOP count, ptlight config composer)
from ptlight.runtime.devices import CUDA_PACK_MULTIPLE_OF  # noqa: E402

T0 = time.perf_counter()
RESULT = "BENCH_GPU_RESULT "
_CTX = (360, 400)  # context words: prompt + completion close to 512 tokens
_350M = bench_dpo.FIXTURES["lfm2-350m"]["arch"]
bench_dpo.FIXTURES.update({
    "gpu-350m": dict(arch=_350M, batch=16, max_length=512, context_words=_CTX),
    "gpu-1.2b": dict(arch={**_350M, "hidden_size": 2048, "intermediate_size": 8192,
                           "num_attention_heads": 32, "num_key_value_heads": 8},
                     batch=8, max_length=512, context_words=_CTX),
    # the 1.2B fixture's layers, rows and batch at width 64: its step dispatches the same ops
    # as gpu-1.2b's and computes next to nothing, so on the CPU its profile (``--profile``)
    # shows a 1.2B step's host work (``--device cpu --fixture layout-1.2b --precision
    # bf16-mixed``)
    "layout-1.2b": dict(arch={**_350M, "hidden_size": 64, "intermediate_size": 256,
                              "num_attention_heads": 4, "num_key_value_heads": 1,
                              "vocab_size": 4096},
                        batch=8, max_length=512, context_words=_CTX),
})
# packed, widths in 128-token steps, the layouts built by 2 DataLoader workers: what
# method.pack / pack_multiple_of / data.num_workers=auto settle to on one GPU with a
# precomputed reference (ptlight.runtime.devices)
PACK = ["method.pack=true", f"method.pack_multiple_of={CUDA_PACK_MULTIPLE_OF}",
        "data.num_workers=2"]
PADDED = ["method.pack=false", "data.num_workers=0"]
PTLIGHT_CONFIGS = {
    "default": [],                                               # as shipped
    "copy": ["method.reference=copy"],                            # live reference: padded on GPUs
    "copy_pack": ["method.reference=copy", *PACK],                # live reference, packed
    "precompute": ["method.reference=precompute", *PADDED],
    "precompute_pack": ["method.reference=precompute", *PACK],    # the defaults, spelled out
    "precompute_compile": ["method.reference=precompute", *PADDED, "model.compile=true"],
    "precompute_pack_compile": ["method.reference=precompute", *PACK, "model.compile=true"],
    "pack_compile": ["method.reference=copy", *PACK, "model.compile=true"],
    "precompute_ckpt": ["method.reference=precompute", "model.gradient_checkpointing=true"],
    "cudnn_attention": ["cudnn_attention=true"],                  # SDPA may use cuDNN
    "stock_norm": ["model.fused_norm=false"],                     # defaults, stock RMSNorm
    "unfused": ["model.fuse_projections=false"],                  # one matmul a projection
    "fused": ["model.fuse_projections=true"],                     # q/k/v, w1/w3 fused at any width
    "compile": ["model.compile=true"],                            # defaults + compiled layers
    "compile_packed": ["model.compile=packed"],                   # only packed scoring compiled
    "pin": ["data.pin_memory=true"],                              # defaults + pinned batches
    "flex": ["model.packed_attention=flex"],                      # block-sparse FlexAttention
    "flex_compile": ["model.packed_attention=flex", "model.compile=true"],
    # + CUDA graphs of the compiled layers (torch.compile's reduce-overhead mode)
    "flex_compile_graphs": ["model.packed_attention=flex", "model.compile=true",
                            "model.compile_mode=reduce-overhead"],
    "compile_graphs": ["model.compile=true", "model.compile_mode=reduce-overhead"],
}
TRL_CONFIGS = {
    "default": {},                                                # gradient checkpointing on
    "best": {"precompute_ref_log_probs": True, "gradient_checkpointing": False},
}
# The full run, in the order it runs: what decides issue 15's targets first (TRL's best and the
# defaults at both shapes), each with model.fuse_projections the other way (auto fuses the 350M
# layers and not the 1.2B ones: at commit 9f66449, bench_results/h200-2026-11-27d, fusing made
# the 350M step 1.36x faster, its GPU waiting on the host, and the 1.2B step 5% slower, its
# kernels filling it), then the opt-ins that could close what is left: the 350M CUDA-graph
# variants (they take the host out of the step), then 1.2B's flex variant (the one whose
# kernels alone reach 45% there; it needs more than 110 s to compile), then the levers one at
# a time.
PLAN = [
    ("gpu-1.2b", "trl", "best"), ("gpu-1.2b", "ptlight", "default"),
    ("gpu-1.2b", "ptlight", "fused"),
    ("gpu-350m", "trl", "best"), ("gpu-350m", "ptlight", "default"),
    ("gpu-350m", "ptlight", "unfused"),
    ("gpu-350m", "ptlight", "compile_graphs"), ("gpu-350m", "ptlight", "flex_compile_graphs"),
    ("gpu-1.2b", "ptlight", "flex_compile_graphs"), ("gpu-1.2b", "ptlight", "compile_graphs"),
    ("gpu-350m", "ptlight", "flex_compile"), ("gpu-350m", "ptlight", "compile"),
    ("gpu-1.2b", "ptlight", "flex_compile"), ("gpu-1.2b", "ptlight", "compile"),
    ("gpu-350m", "ptlight", "flex"), ("gpu-1.2b", "ptlight", "flex"),
    ("gpu-350m", "ptlight", "pin"), ("gpu-350m", "ptlight", "cudnn_attention"),
    ("gpu-350m", "ptlight", "stock_norm"), ("gpu-350m", "ptlight", "copy_pack"),
    ("gpu-350m", "ptlight", "compile_packed"), ("gpu-350m", "ptlight", "copy"),
    ("gpu-350m", "ptlight", "precompute"),
]
OTHER_FIXTURES = (["best"], ["default", "precompute"])  # (TRL, ptlight) runs elsewhere (tiny)


def plan_for(fixtures: list[str], ptlight: str | None, trl: str | None
             ) -> list[tuple[str, str, str]]:
    """``(fixture, framework, config)`` runs: :data:`PLAN` for its fixtures unless
    ``--ptlight``/``--trl`` name the configs (then TRL's first, per fixture)."""
    out = []
    for fixture in fixtures:
        planned = [r for r in PLAN if r[0] == fixture]
        if planned and ptlight is None and trl is None:
            out += planned
            continue
        trl_cfgs = ([c for c in trl.split(",") if c] if trl is not None else
                    [c for f, fw, c in planned if fw == "trl"] or OTHER_FIXTURES[0])
        pt_cfgs = (ptlight.split(",") if ptlight else
                   [c for f, fw, c in planned if fw == "ptlight"] or OTHER_FIXTURES[1])
        out += [(fixture, "trl", c) for c in trl_cfgs]
        out += [(fixture, "ptlight", c) for c in pt_cfgs]
    return sorted(out, key=lambda r: PLAN.index(r) if r in PLAN else len(PLAN))


# ---- children ----------------------------------------------------------------------------
class _Clock:
    """Step-end times and batch token counts of one run. Once ``total`` steps are timed (and
    their batches counted), ``finish`` prints the result and the process exits at once: the
    export, checkpoint and teardown of a training run are not what is measured, and at the
    1.2B shape they took longer than the steps.

    On CUDA the step times are those of CUDA events recorded at the start and at each
    optimizer-step end, read once the timed steps are done: the clock never makes the host
    wait for the GPU, so a step whose host work runs ahead of its kernels is timed as it runs
    in training (a synchronize at each step end would idle the GPU while the host prepares
    the next step). ``ends`` holds the host's times of the same marks."""

    def __init__(self, device: str) -> None:
        self.device, self.start, self.ends, self.batches = device, None, [], []
        self.events: list = []  # CUDA events: the start, then each step end
        self.total: int | None = None  # steps to run before finishing
        self.timed: int | None = None  # of those, the first this many are timed (default all)
        self.finish = None

    def maybe_finish(self) -> None:
        if (self.finish is not None and len(self.ends) >= self.total
                and len(self.batches) >= self.total):
            print(RESULT + json.dumps(self.finish()), flush=True)
            sys.stderr.flush()
            os._exit(0)

    def mark(self) -> None:
        if self.device == "cuda":
            import torch

            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()

    def begin(self) -> None:
        self.mark()
        self.start = time.perf_counter()

    def step_end(self) -> None:
        self.mark()
        self.ends.append(time.perf_counter())
        self.maybe_finish()

    def step_times(self, timed: int) -> list[float]:
        """Seconds of each of the first ``timed`` steps (the first from the run's start)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            marks = self.events[:timed + 1]
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        marks = [self.start, *self.ends[:timed]]
        return [b - a for a, b in zip(marks, marks[1:])]

    def result(self, warmup: int, pairs: int, live_reference: bool) -> dict:
        import torch

        timed = self.timed or len(self.ends)
        steps = self.step_times(timed)[warmup:]
        med = lambda k: statistics.median(b[k] for b in self.batches[:timed])  # noqa: E731
        cuda = self.device == "cuda"
        return {"steps": timed, "step_s": statistics.median(steps),
                "step_times": steps, "pairs": pairs, "tokens": med("tokens"),
                "tokens_run": med("tokens_run"), "scored": med("scored"),
                "live_reference": live_reference, "setup_s": self.start - T0,
                "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None}


def compile_counts() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks, and CUDA graphs
    skipped (``model.compile_mode=reduce-overhead`` falls back to the compiled kernels
    without a graph, silently, for a graph with CPU tensors or mutated inputs)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


class SyncSources:
    """Where the profiled steps made the host wait on the GPU: torch's sync debug mode warns
    at each synchronising call, and each warning's Python stack (past torch's own frames and
    this script's clock) is counted. CUDA only; nothing is recorded on the CPU."""

    def __init__(self, device: str) -> None:
        self.device, self.sources, self._caught = device, {}, None

    def start(self) -> None:
        if self.device != "cuda":
            return
        import warnings

        import torch

        self._caught = warnings.catch_warnings()  # restores the filters and showwarning
        self._caught.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._caught is None:
            return
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        self._caught = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "/warnings.py" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in reversed(frames[-4:]))
        self.sources[where] = self.sources.get(where, 0) + 1


def child_ptlight(args) -> dict:
    from ptlight.methods.preference import PreferenceMethod
    from ptlight.train import train_stage

    fx, spec = Path(args.fixture_dir), bench_dpo.FIXTURES[args.fixture]
    clock = _Clock(args.device)
    bench_dpo.time_preference_steps(clock)
    counted = PreferenceMethod.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):  # the batch is counted: done?
        counted(self, outputs, batch, batch_idx)
        settled["packed"] = self.packs  # what the run's auto keys settled to
        settled["live"] = self.reference.mode in ("copy", "adapter")
        done = len(clock.ends)
        if args.profile and done == clock.timed:  # after the timed steps
            syncs.start()
            profiler.start()
        elif args.profile and done == clock.timed + args.profile:
            profiler.stop()
            syncs.stop()
            stacked.start()
        elif args.profile and done == clock.total:
            stacked.stop()
            write_profile(profiler, stacked, Path(args.profile_out), args.device,
                          clock.step_times(clock.total)[clock.timed:][:args.profile], syncs)
        clock.maybe_finish()

    PreferenceMethod.on_train_batch_end = on_train_batch_end
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    # one epoch over the fixture, as a run that uses every row (what the defaults are settled
    # for: ptlight.runtime.devices); the process exits once its steps are timed
    cfg = bench_dpo.ptlight_cfg(fx, args.fixture, precision, [
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.max_steps=-1", "trainer.max_epochs=1", "method.reference_cache=null",
        f"seed={args.seed}", *PTLIGHT_CONFIGS[args.config]])
    settled: dict = {}

    def finish() -> dict:
        bench_dpo.count_tokens(clock.batches, settled["packed"])
        return {**clock.result(args.warmup, spec["batch"], live_reference=settled["live"]),
                "compile": compile_counts()}

    clock.timed = args.warmup + args.steps
    clock.total, clock.finish = clock.timed + 2 * args.profile, finish
    syncs = SyncSources(args.device)
    if args.profile:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        profiler = tp.profile(activities=activities)
        # the next steps again, with the Python calls recorded (which slows the host): what
        # called the ops, apart from the timings above
        stacked = tp.profile(activities=[tp.ProfilerActivity.CPU], with_stack=True)
    with tempfile.TemporaryDirectory() as run_dir:
        train_stage(cfg, Path(run_dir))
    return finish()  # only if the run ended before its steps were timed


def write_profile(profiler, stacked, path: Path, device: str, step_s: list[float],
                  syncs: SyncSources | None = None) -> None:
    """``--profile N``: where the N steps after the timed ones (``profiler``) spent their
    time. A summary (wall time per step; with CUDA, the kernels' summed time per step, hence
    how long the GPU waited on the host, and kernel launches per step), torch.profiler's
    tables of the ops with the most device (else host) time, the most frequent and (CUDA) the
    most host time; then, from N steps more profiled with their Python calls (``stacked``),
    which Python lines called the scalar read-backs and the ops' host time."""
    import torch

    events = profiler.key_averages()
    steps = len(step_s)
    wall = sum(step_s) / steps
    lines = [f"profiled steps: {steps}; wall per step: {wall * 1e3:.1f} ms"]
    sort = "self_cpu_time_total"
    if device == "cuda":
        # kernels only: a user annotation (the optimizer's step range, which torch records on
        # the GPU's timeline too) spans kernels that are already counted
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
        launches = sum(e.count for e in kernels) / steps
        lines.append(f"GPU kernel time per step: {busy * 1e3:.1f} ms ({busy / wall:.0%} of the "
                     f"wall time); kernels per step: {launches:.0f}")
        sort = "self_device_time_total"
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
           and e.key.startswith("aten::")]
    lines.append(f"aten ops dispatched per step (host work, one launch or more each on a GPU): "
                 f"{sum(e.count for e in ops) / steps:.0f}")
    reads = sum(e.count for e in ops if e.key == "aten::_local_scalar_dense")
    lines.append(f"scalar read-backs per step (aten::_local_scalar_dense): {reads / steps:.1f}")
    lines += [f"  {n / steps:6.1f}  from {where}" for where, (_, n) in
              host_by_source(stacked, op="aten::_local_scalar_dense")[:8]]
    if syncs is not None and device == "cuda":
        total = sum(syncs.sources.values())
        lines.append(f"host syncs per step (torch.cuda sync debug mode): {total / steps:.1f}")
        lines += [f"  {n / steps:6.1f}  {where}" for where, n in
                  sorted(syncs.sources.items(), key=lambda kv: -kv[1])[:12]]
    lines.append(events.table(sort_by=sort, row_limit=40, max_name_column_width=60))
    lines.append("most frequent ops (calls over all profiled steps):")
    lines.append(events.table(sort_by="count", row_limit=30, max_name_column_width=60))
    if device == "cuda":  # the host's own time: what a host-bound step waits on
        lines.append("host time by op (self CPU time over all profiled steps):")
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=30,
                                  max_name_column_width=60))
    lines.append("host time of the aten ops by the Python line that called them (CPU time "
                 "per step with the Python calls recorded, calls per step; the innermost "
                 "frame outside torch):")
    lines += [f"  {t / steps / 1e3:8.2f} ms  {n / steps:7.1f}  {where}"
              for where, (t, n) in host_by_source(stacked)[:30]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2]), flush=True)


def host_by_source(profiler, op: str | None = None) -> list[tuple[str, tuple[float, int]]]:
    """The profiled aten ops called from Python (not from inside another op; ``op``: only
    those, wherever they are called): their CPU time (µs, what they call included) and count
    by the innermost Python frame outside torch that called them (``with_stack=True`` records
    the Python calls as events, an op's enclosing ones its ``cpu_parent`` chain), most time
    first."""
    by: dict[str, list] = {}
    for e in profiler.events():
        if op is not None and e.name != op:
            continue
        if op is None and (not e.name.startswith("aten::") or _is_op(e.cpu_parent)):
            continue
        parent = e.cpu_parent
        while parent is not None and not _is_python_frame(parent):
            parent = parent.cpu_parent
        slot = by.setdefault(parent.name if parent is not None else "(no Python frame)",
                             [0.0, 0])
        slot[0] += e.cpu_time_total
        slot[1] += 1
    return sorted(((w, (t, n)) for w, (t, n) in by.items()), key=lambda kv: -kv[1][0])


def _is_op(event) -> bool:
    return event is not None and event.name.startswith("aten::")


def _is_python_frame(event) -> bool:
    """A Python call recorded by the profiler (``file.py(line): name``), outside torch."""
    return event is not None and ".py(" in event.name and not event.name.startswith("torch/")


def child_trl(args) -> dict:
    fx, spec = Path(args.fixture_dir), bench_dpo.FIXTURES[args.fixture]
    clock = _Clock(args.device)
    cuda = args.device == "cuda"
    live = bench_dpo.trl_live_reference(TRL_CONFIGS[args.config])
    clock.total = args.warmup + args.steps

    def finish() -> dict:
        bench_dpo.count_trl_tokens(clock.batches)
        return clock.result(args.warmup, spec["batch"], live_reference=live)

    clock.finish = finish
    bench_dpo.train_trl(fx, spec, clock, args, TRL_CONFIGS[args.config], bf16=cuda,
                        use_cpu=not cuda)
    return clock.finish()


# ---- parent ------------------------------------------------------------------------------
def matmul_seconds(m: int, k: int, n: int, device: str, reps: int) -> list[float]:
    """Seconds per ``[m, k]·[k, n]`` product (bf16 on CUDA, fp32 on CPU), in each of 5 trials
    of ``reps`` products after 3 warm-up ones (CUDA events on the GPU)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        if device == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            times.append((time.perf_counter() - t0) / reps)
    return times


def matmul_peak_tflops(device: str) -> float:
    """Best bf16 (CUDA) / fp32 (CPU) matmul TFLOP/s measured here."""
    if device != "cuda":
        return bench_dpo.matmul_peak("32-true") / 1e3
    n = 8192
    return 2 * n**3 / min(matmul_seconds(n, n, n, device, reps=10)) / 1e12


def linear_shapes(fixture: str) -> list[tuple[int, int, int]]:
    """``(in, out, count)`` of the matmul weights of a fixture's decoder layers (the FLOPs of
    :func:`bench_dpo.param_counts`' body, shape by shape)."""
    a = bench_dpo.FIXTURES[fixture]["arch"]
    h, f = a["hidden_size"], a["intermediate_size"]
    kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
    n_attn = sum(t == "full_attention" for t in a["layer_types"])
    n_conv = len(a["layer_types"]) - n_attn
    shapes = {(h, 3 * h): n_conv, (h, h): n_conv + 2 * n_attn, (h, kv): 2 * n_attn,
              (h, f): 2 * len(a["layer_types"]), (f, h): len(a["layer_types"])}
    return [(i, o, c) for (i, o), c in shapes.items() if c]


def gemm_bound_s(fixture: str, tokens_run: float, scored: float, live: bool, device: str,
                 cache: dict) -> float:
    """Seconds one step's matmuls take alone on this device at the step's own shapes: each
    decoder weight's forward ``[T, in]·[in, out]`` and its two backward products (input and
    weight gradients) over the T tokens the body runs, the LM head's three over the M scored
    positions, and a forward more of each when the reference runs live. No attention scores,
    no elementwise work, no launch gaps: the step's FLOPs over this time is the highest MFU
    that step can reach with these matmul shapes on this card (bf16 on CUDA, fp32 on CPU)."""
    import torch

    def mm(m: int, k: int, n: int) -> float:
        if (m, k, n) not in cache:
            reps = 20 if device == "cuda" else 3
            cache[(m, k, n)] = statistics.median(matmul_seconds(m, k, n, device, reps))
        return cache[(m, k, n)]

    def linear(rows: int, i: int, o: int) -> float:
        forward = mm(rows, i, o)
        return forward * (2 if live else 1) + mm(rows, o, i) + mm(o, rows, i)

    # T rounded up to a whole packed width step: the packed step's products run over rows of
    # such widths, aligned; an odd T would time cuBLAS on unaligned operands instead (the
    # weight gradients' inner dimension), which the step never runs
    step = CUDA_PACK_MULTIPLE_OF
    t, m = -(-max(int(tokens_run), 1) // step) * step, max(int(scored), 1)
    a = bench_dpo.FIXTURES[fixture]["arch"]
    body = sum(c * linear(t, i, o) for i, o, c in linear_shapes(fixture))
    total = body + linear(m, a["hidden_size"], a["vocab_size"])
    if device == "cuda":
        torch.cuda.empty_cache()  # the next run's process gets the card back
    return total


def run_timeout_s(run_timeout: float, limit: float, elapsed: float) -> float:
    """Seconds a run started ``elapsed`` seconds into the plan may take: ``--run-timeout``, cut
    to what is left of ``--limit`` (at least 1 s, so the run starts and is listed)."""
    return max(1.0, min(run_timeout, limit - elapsed))


def run_child(framework: str, config: str, fixture: str, fx: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--config", config,
           "--fixture", fixture, "--fixture-dir", str(fx), "--device", args.device,
           "--steps", str(args.steps_for(fixture)), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.profile and framework == "ptlight":
        cmd += ["--profile", str(args.profile),
                "--profile-out", str(Path(args.out) / f"profile_{fixture}_{config}.txt")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.time()
    timeout = run_timeout_s(args.run_timeout, args.limit, time.perf_counter() - T0)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:  # its partial output comes as bytes
        stdout, stderr = (o.decode(errors="replace") if isinstance(o, bytes) else o or ""
                          for o in (exc.stdout, exc.stderr))
        stderr += (f"\ntimed out after {timeout:.0f} s (--run-timeout {args.run_timeout:.0f}, "
                   f"--limit {args.limit:.0f} s for the whole plan)")
        code = -1
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if code or not lines:
        tail = (stdout + stderr)[-2500:]
        print(f"!! {framework}/{config} {fixture} failed:\n{tail}", flush=True)
        return {"framework": framework, "config": config, "error": tail[-800:]}
    out = json.loads(lines[-1][len(RESULT):])
    out.update(framework=framework, config=config, wall_s=round(time.time() - started, 1))
    mem = (f"{out['peak_allocated_gb']:.1f} GB alloc, {out['peak_reserved_gb']:.1f} GB reserved"
           if out["peak_allocated_gb"] is not None else "")
    counts = out.get("compile") or {}
    compiled = (f"  compiled graphs {counts['unique_graphs']}, breaks {counts['graph_breaks']}, "
                f"CUDA graphs skipped {counts['cudagraph_skips']}"
                if counts.get("unique_graphs") else "")
    print(f"   {framework:7s} {config:16s} {out['pairs'] / out['step_s']:8.2f} pairs/s "
          f"{out['step_s'] * 1e3:8.1f} ms/step  {mem}  wall {out['wall_s']:.0f} s{compiled}",
          flush=True)
    return out


def summarize(fixture: str, runs: list[dict], peak_tflops: float,
              gemm_s: dict | None = None) -> dict:
    """Per-run figures of one fixture; ``gemm_s``: run name -> :func:`gemm_bound_s`."""
    stats = {}
    for r in runs:
        name = f"{r['framework']} {r['config']}"
        if "error" in r:
            stats[name] = {"error": r["error"]}
            continue
        flops = bench_dpo._flops(r, fixture)
        stats[name] = {
            "pairs_per_s": r["pairs"] / r["step_s"], "tokens_per_s": r["tokens"] / r["step_s"],
            "step_s": r["step_s"], "steps": r["steps"], "step_times": r["step_times"],
            "peak_allocated_gb": r["peak_allocated_gb"],
            "peak_reserved_gb": r["peak_reserved_gb"], "setup_s": r["setup_s"],
            "wall_s": r["wall_s"], "flops_per_step": flops,
            "mfu": flops / r["step_s"] / (peak_tflops * 1e12),
            "live_reference": r["live_reference"],
            "mfu_data": bench_dpo.data_flops(r["tokens"], fixture, r["live_reference"])
            / r["step_s"] / (peak_tflops * 1e12)}
        if "compile" in r:  # ptlight runs: what torch.compile did
            stats[name]["compile"] = r["compile"]
        if gemm_s and name in gemm_s:
            stats[name].update(gemm_bound_s=gemm_s[name],
                               gemm_bound_mfu=flops / gemm_s[name] / (peak_tflops * 1e12))
    rec = {"fixture": fixture, "matmul_peak_tflops": peak_tflops, "runs": stats}
    trl = {k: v for k, v in stats.items() if k.startswith("trl") and "error" not in v}
    if not trl:
        return rec
    best = max(trl, key=lambda k: trl[k]["pairs_per_s"])
    rec["trl_best"] = best
    ratios = {}
    for name, v in stats.items():  # every ptlight run against TRL's best of this run
        if name.startswith("ptlight") and "error" not in v:
            ratios[name] = {"speedup": v["pairs_per_s"] / trl[best]["pairs_per_s"]}
            if v["peak_allocated_gb"] is not None:
                ratios[name]["memory_ratio"] = (v["peak_allocated_gb"]
                                                / trl[best]["peak_allocated_gb"])
    rec["vs_trl_best"] = ratios
    if "ptlight default" in ratios:  # the shipped defaults: what the targets are about
        rec.update(ratios["ptlight default"])
    return rec


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['device_name']} (torch {meta['torch']}, "
             f"transformers {meta['transformers']}, lightning {meta['lightning']}, "
             f"TRL {meta['trl']}); `python scripts/bench_gpu.py`.", "",
             "| fixture | run | pairs/s | tokens/s | ms/step | peak alloc GB | peak reserved GB "
             "| MFU | data MFU | GEMM-bound MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for name, s in rec["runs"].items():
            if "error" in s:
                what = "skipped" if s["error"].startswith("skipped") else "failed"
                lines.append(f"| {rec['fixture']} | {name} | {what} | | | | | | | |")
                continue
            gb = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(
                f"| {rec['fixture']} | {name} | {s['pairs_per_s']:.1f} | {s['tokens_per_s']:.0f} "
                f"| {s['step_s'] * 1e3:.0f} | {gb(s['peak_allocated_gb'])} | "
                f"{gb(s['peak_reserved_gb'])} | {100 * s['mfu']:.0f}% | "
                f"{100 * s['mfu_data']:.0f}% | "
                + (f"{100 * s['gemm_bound_mfu']:.0f}% |" if "gemm_bound_mfu" in s else " |"))
        fastest = max(rec.get("vs_trl_best", {}).items(), key=lambda kv: kv[1]["speedup"],
                      default=None)
        for name in dict.fromkeys(["ptlight default", fastest[0] if fastest else None]):
            r = rec.get("vs_trl_best", {}).get(name) if name else None
            if r is None:
                continue
            mem = f", memory {r['memory_ratio']:.2f}×" if "memory_ratio" in r else ""
            lines.append(f"| {rec['fixture']} | **{name} ÷ {rec['trl_best']}** | "
                         f"**{r['speedup']:.2f}×**{mem} | | | | | | | |")
    lines.append("")
    if records:
        kind = "bf16 (8192³)" if meta["device_name"] != "CPU" else "fp32"
        lines.append(f"MFU is of the {kind} matmul peak measured in the same run: "
                     f"{records[0]['matmul_peak_tflops']:.2f} TFLOP/s. GEMM-bound MFU: the "
                     "same FLOPs over the time the step's matmuls take alone at the step's "
                     "own shapes (T tokens × each weight, forward and both backward "
                     "products), i.e. the MFU of a step that were nothing but its matmuls. "
                     "MFU counts the FLOPs the run's body computes (a packed row runs a "
                     "shared prompt once; the LM head only on scored tokens); data MFU counts "
                     "6·N·T with N every parameter and T the tokens of both sequences of every "
                     "pair, the usual convention (issue 15's 22% baseline is this count), "
                     "which credits a packed run with the prompt it shares.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_gpu_out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--fixture", default="gpu-350m,gpu-1.2b")
    p.add_argument("--ptlight", default=None, help="comma list of ptlight configs (default: plan)")
    p.add_argument("--trl", default=None, help="comma list of TRL configs (default: plan)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=int, default=150)
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds after which no further run starts")
    p.add_argument("--limit", type=float, default=470.0,
                   help="seconds after which a running run is stopped (the plan's hard end)")
    p.add_argument("--profile", type=int, default=0,
                   help="ptlight runs: profile this many steps after the timed ones, then as "
                        "many with their Python calls recorded, into "
                        "<out>/profile_<fixture>_<config>.txt (torch.profiler)")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"],
                   help="ptlight runs (default: bf16-mixed on CUDA, 32-true on the CPU)")
    p.add_argument("--profile-out")
    p.add_argument("--child", choices=["ptlight", "trl"])
    p.add_argument("--config")
    p.add_argument("--fixture-dir")
    args = p.parse_args()
    args.steps_for = lambda fixture: args.steps
    if args.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        res = (child_ptlight if args.child == "ptlight" else child_trl)(args)
        print(RESULT + json.dumps(res), flush=True)
        return

    import lightning
    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible (use --device cpu --fixture tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "transformers": transformers.__version__, "lightning": lightning.__version__,
            "trl": trl_version,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda"
            else "CPU"}
    peak = matmul_peak_tflops(args.device)
    print(f"{meta['device_name']}: matmul peak {peak:.1f} TFLOP/s", flush=True)
    fixtures = args.fixture.split(",")
    plan = plan_for(fixtures, args.ptlight, args.trl)
    if trl_version is None:
        print("TRL is not installed: ptlight runs only (pip install -e '.[bench]')")
        plan = [r for r in plan if r[1] != "trl"]
    runs: dict[str, list[dict]] = {f: [] for f in fixtures}
    gemm_s: dict[str, dict[str, float]] = {f: {} for f in fixtures}
    gemm_cache: dict = {}
    fixture_dirs: dict[str, Path] = {}
    for fixture, fw, cfg in plan:
        if time.perf_counter() - T0 > args.budget:
            print(f"!! {fw}/{cfg} {fixture} skipped: --budget {args.budget:.0f} s spent",
                  flush=True)
            runs[fixture].append({"framework": fw, "config": cfg,
                                  "error": f"skipped: --budget {args.budget:.0f} s spent"})
        else:
            if fixture not in fixture_dirs:
                spec = bench_dpo.FIXTURES[fixture]
                rows = (args.warmup + args.steps + 2 * args.profile + 2) * spec["batch"]
                fixture_dirs[fixture] = bench_dpo.build_fixture(fixture, out / "fixtures", rows,
                                                                args.seed)
                print(f"== {fixture} ({time.perf_counter() - T0:.0f} s)", flush=True)
            result = run_child(fw, cfg, fixture, fixture_dirs[fixture], args)
            runs[fixture].append(result)
            if "error" not in result:
                gemm_s[fixture][f"{fw} {cfg}"] = gemm_bound_s(
                    fixture, result["tokens_run"], result["scored"], result["live_reference"],
                    args.device, gemm_cache)
        records = [summarize(f, runs[f], peak, gemm_s[f]) for f in fixtures if runs[f]]
        (out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "records": records},
                                                       indent=2))
        (out / "bench_gpu.md").write_text(markdown(records, meta))
    print((out / "bench_gpu.md").read_text())
    print(f"total {time.perf_counter() - T0:.0f} s")


if __name__ == "__main__":
    main()
