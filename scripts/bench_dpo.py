"""DPO throughput and memory: ptlight's fast path vs TRL's DPOTrainer, side by side.

    pip install -e ".[bench]"          # TRL, only for this script
    python scripts/bench_dpo.py --out bench_out                  # everything (slow on a CPU)
    python scripts/bench_dpo.py --fixtures bench --precisions 32-true --repeats 2
    python scripts/bench_dpo.py --profile --fixtures bench       # where ptlight's step time goes

Fixtures, built offline into ``<out>/fixtures`` (random init, saved with ``save_pretrained``
so both frameworks load the very same weights from disk):

- ``bench``: ``Lfm2ForCausalLM``, layers ``c,c,A,c,c,A,c,A``, hidden 512, FFN 2048, vocab
  32768, tied embeddings (≈50 M parameters); pairwise rows of the bundled sorting task with
  8–20 words per list behind a short context of 20–56 words, so that prompts are the issue's
  ~50–100 tokens (the bundled tokenizer spends one token per task word: the bare task prompt
  is only 22–34); 8 pairs per batch.
- ``lfm2-350m``: the LFM2-350M shape (hidden 1024, 16 layers of its conv/attention pattern,
  FFN 4608, vocab 65536, tied), random init; sorting pairs behind a long context so that
  prompt + completion is close to 512 tokens; 2 pairs per batch.

Every run is its own subprocess (``--child``), so its peak RSS is its own; runs of the two
frameworks are interleaved (the order alternates between repeats) because the CPU is shared.
Same seed, batch, max length, precision, optimiser (AdamW, lr 5e-5, betas 0.9/0.95, cosine,
clip 1.0), beta 0.1. ptlight runs its real training path (``train_stage`` with ``method=dpo``
overrides, exactly what ``python -m ptlight`` runs); TRL runs ``DPOTrainer`` as configured by
its default, ``padding_free=True`` and ``precompute_ref_log_probs=True`` (best one reported).

Measured: the time between consecutive optimiser-step ends after ``--warmup`` steps (median),
so one-off setup (model load, tokenization, reference precompute) is reported apart as
``setup_s``; peak RSS (``ru_maxrss``) at the end of the last training step. Model FLOPs per
step count the matmuls each framework has to do for the tokens it runs, padding not counted:
6·N_body·T + 6·N_head·M (+ 2·N_body·T + 2·N_head·M when the reference runs live), T = tokens
through the body (ptlight: after prefix sharing), M = scored completion tokens; achieved FLOP/s
is divided by this machine's matmul peak for the precision, measured here (best of square fp32
matmuls; for bf16-mixed the faster of torch's bf16 kernel and the fp32 kernel on bf16-rounded
operands, see :func:`matmul_peak`). Attention-score FLOPs are left out (<1% here).

ptlight runs as shipped: its fast path (packing, prefix sharing, precomputed reference), the
lean LFM2 MLP (``ptlight/engine/lean.py``) and, for bf16-mixed on a CPU without bf16 units,
``cpu_bf16=auto`` -> upcast. ``fast_lowmem`` adds ``malloc_mmap_threshold=131072``
(``ptlight/engine/memory.py``: freed memory back to the OS, slower steps); ``fast_ckpt`` adds
``model.gradient_checkpointing=true``; ``fast_offload`` adds ``optimizer_offload`` (AdamW's
moments in a file under the temp dir, ``ptlight/engine/offload.py``), ``lowmem_offload`` that and
the threshold, ``ckpt_offload`` that and checkpointing; ``fast_compile`` adds
``model.compile=true`` (``ptlight/engine/compile.py``).

Writes ``<out>/bench.json`` (one record per fixture × precision) and ``<out>/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
RESULT = "BENCH_RESULT "

FIXTURES = {
    "bench": dict(
        arch=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4,
                  layer_types=["conv", "conv", "full_attention", "conv", "conv",
                               "full_attention", "conv", "full_attention"],
                  vocab_size=32768),
        batch=8, max_length=256, context_words=(20, 56)),
    "lfm2-350m": dict(
        arch=dict(hidden_size=1024, intermediate_size=4608, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8,
                  layer_types=["conv", "conv", "full_attention", "conv", "conv",
                               "full_attention", "conv", "conv", "full_attention", "conv",
                               "full_attention", "conv", "full_attention", "conv",
                               "full_attention", "conv"],
                  vocab_size=65536),
        batch=2, max_length=512, context_words=(440, 440)),
    "tiny": dict(  # smoke tests only
        arch=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2,
                  layer_types=["conv", "conv", "full_attention"], vocab_size=4096),
        batch=4, max_length=128, context_words=(0, 0)),
}
TRL_CONFIGS = {"default": {}, "padding_free": {"padding_free": True},
               "precompute": {"precompute_ref_log_probs": True}}
_FAST = ["method.pack=true", "method.reference=precompute"]
_LOWMEM = "malloc_mmap_threshold=131072"  # ptlight.engine.memory: less RSS, slower steps
_CKPT = "model.gradient_checkpointing=true"  # less memory, one more body forward
_OFFLOAD = f"optimizer_offload={tempfile.gettempdir()}"  # ptlight.engine.offload: moments on disk
PTLIGHT_CONFIGS = {  # "fast" is what docs/performance.md recommends; "plain" is the path before issue 5
    "fast": _FAST,
    "fast_ckpt": [*_FAST, _CKPT],
    "fast_lowmem": [*_FAST, _LOWMEM],
    "fast_offload": [*_FAST, _OFFLOAD],
    "lowmem_offload": [*_FAST, _LOWMEM, _OFFLOAD],
    "ckpt_offload": [*_FAST, _CKPT, _OFFLOAD],
    "fast_compile": [*_FAST, "model.compile=true"],
    "plain": ["method.pack=false", "method.reference=copy"],
}


# ---- fixtures --------------------------------------------------------------------------
def _rows(name: str, n: int, seed: int) -> list[dict]:
    import random

    from ptlight.tasks.sort import WORDS, make_rows

    rows = make_rows("pairwise", n, seed, "train", min_words=8, max_words=20)
    lo, hi = FIXTURES[name]["context_words"]
    if hi:  # a context before the task (lfm2-350m: prompt + completion near max_length)
        rng = random.Random(seed)
        for r in rows:
            words = rng.randint(lo, hi)
            context = " ".join(rng.choice(WORDS) for _ in range(words))
            r["prompt"] = [{"role": "user",
                            "content": f"Context: {context}\n{r['prompt'][0]['content']}"}]
    return rows


def build_fixture(name: str, root: Path, n_rows: int, seed: int = 0) -> Path:
    """Model + tokenizer dir and train/val jsonl under ``root/name`` (kept if already there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptlight.model.backbone import BUNDLED_TOKENIZER

    fx = root / name
    stamp = fx / "fixture.json"
    spec = {"name": name, "rows": n_rows, "seed": seed, **FIXTURES[name]}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
        return fx
    fx.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    arch = dict(FIXTURES[name]["arch"])
    config = AutoConfig.for_model(
        "lfm2", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, conv_L_cache=3,
        block_auto_adjust_ff_dim=False, max_position_embeddings=4096, **arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(fx / "model", safe_serialization=True)
    tok.save_pretrained(fx / "model")
    for split, n, s in (("train", n_rows, seed), ("val", 8, seed + 1)):
        with open(fx / f"{split}.jsonl", "w") as f:
            for r in _rows(name, n, s):
                f.write(json.dumps(r) + "\n")
    stamp.write_text(json.dumps(spec))
    return fx


def param_counts(name: str) -> tuple[int, int]:
    """(matmul parameters of the decoder layers, LM-head parameters) of a fixture's shape."""
    a = FIXTURES[name]["arch"]
    h, f = a["hidden_size"], a["intermediate_size"]
    kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
    conv, attn, mlp = 3 * h * h + h * h, 2 * h * h + 2 * h * kv, 3 * h * f
    body = sum((attn if t == "full_attention" else conv) + mlp for t in a["layer_types"])
    return body, a["vocab_size"] * h


def matmul_peak(dtype_name: str) -> float:
    """Best GFLOP/s of square fp32-input matmuls run as the Trainer runs this precision
    (``scripts/bench_precision.py``'s timer and modes; torch's default thread count).

    ``bf16-mixed``: the faster of autocast on torch's bf16 kernel and ``cpu_bf16=upcast``
    (fp32 kernel on bf16-rounded operands; on CPUs without bf16 units torch's own kernel
    reaches ~1 GFLOP/s, which would make every MFU meaningless)."""
    import torch

    from bench_precision import gflops

    modes = ["fp32"] if dtype_name == "32-true" else ["bf16 native", "bf16 upcast"]
    peak = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for mode in modes:
            if mode == "bf16 native" and n > 512:  # too slow to time where there are no units
                continue
            peak = max(peak, gflops(lambda: a @ b, 2 * n**3, mode))
    return peak


# ---- children --------------------------------------------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Step-end timestamps, peak RSS at the last one, token counts of every batch."""

    def __init__(self) -> None:
        self.start = None
        self.ends: list[float] = []
        self.faults: list[int] = []  # minor page faults (fresh pages) up to each step end
        self.rss_mb = 0.0
        self.batches: list[dict] = []

    def begin(self) -> None:
        self.start = time.perf_counter()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        self.rss_mb = _rss_mb()

    def result(self, warmup: int, pairs: int, **extra) -> dict:
        marks = [self.start, *self.ends]
        steps = [b - a for a, b in zip(marks, marks[1:])][warmup:]
        per = lambda k: statistics.median(b[k] for b in self.batches)  # noqa: E731
        faults = [b - a for a, b in zip(self.faults, self.faults[1:])][max(warmup - 1, 0):]
        return {"steps": len(self.ends), "step_times": steps,
                "step_s": statistics.median(steps), "pairs": pairs,
                "page_faults_per_step": statistics.median(faults) if faults else None,
                "tokens": per("tokens"), "tokens_run": per("tokens_run"),
                "scored": per("scored"), "peak_rss_mb": self.rss_mb,
                "final_rss_mb": _rss_mb(), "setup_s": self.start - T0, **extra}


def ptlight_cfg(fx: Path, fixture: str, precision: str, extra: list[str]):
    """The composed ptlight config of a benchmark run (what ``python -m ptlight`` would get)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ptlight.config import config_dir, register_resolvers

    spec = FIXTURES[fixture]
    register_resolvers()
    overrides = [
        "method=dpo", f"model.path={fx / 'model'}", f"data.path={fx / 'train.jsonl'}",
        f"data.val_path={fx / 'val.jsonl'}", "data.task=null", f"data.batch_size={spec['batch']}",
        f"data.max_length={spec['max_length']}", f"trainer.precision={precision}",
        "trainer.val_check_interval=1000000", "+trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=1000000",
        "eval.before=false", "eval.val_samples=0", *extra,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def time_preference_steps(clock) -> None:
    """Patch ptlight's preference method so that ``clock`` sees the start of training
    (``clock.begin()``), every optimiser-step end (``clock.step_end()``) and every batch's
    token tensors (``clock.batches``)."""
    from ptlight.methods.preference import PreferenceMethod

    def on_train_start(self):
        clock.begin()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        clock.step_end()
        # copies where the batch is (no read to the host inside the run); count_tokens reads them
        clock.batches.append({k: batch[k].detach().clone()
                              for k in ("input_ids", "attention_mask", "loss_mask")})

    PreferenceMethod.on_train_start = on_train_start
    PreferenceMethod.on_train_batch_end = on_train_batch_end


def count_tokens(batches: list[dict], packed: bool) -> None:
    """Per batch: ``tokens`` (real tokens), ``scored`` (completion tokens) and ``tokens_run``
    (what the body runs: after prefix sharing when ``packed``)."""
    from ptlight.engine.packing import pack

    for b in batches:
        b.update({k: b[k].cpu() for k in ("input_ids", "attention_mask", "loss_mask")})
        b["tokens"] = int(b["attention_mask"].sum())
        b["scored"] = int(b["loss_mask"][:, 1:].sum())
        b["tokens_run"] = (pack(b["input_ids"], b["attention_mask"], b["loss_mask"], 2).num_tokens
                           if packed else b["tokens"])


def child_ptlight(args) -> dict:
    import torch

    from ptlight.train import train_stage

    fx, spec = Path(args.fixture_dir), FIXTURES[args.fixture]
    clock = _Clock()
    config = args.config
    cache = tempfile.mkdtemp(prefix="ptl-bench-refcache-")  # a miss: the full precompute runs
    time_preference_steps(clock)
    cfg = ptlight_cfg(fx, args.fixture, args.precision, [
        f"trainer.max_steps={args.warmup + args.steps}", f"method.reference_cache={cache}",
        f"seed={args.seed}", *PTLIGHT_CONFIGS[config]])
    with tempfile.TemporaryDirectory() as run_dir:
        train_stage(cfg, Path(run_dir))
    count_tokens(clock.batches, "method.pack=true" in PTLIGHT_CONFIGS[config])
    live_ref = "method.reference=copy" in PTLIGHT_CONFIGS[config]
    return clock.result(args.warmup, spec["batch"], live_reference=live_ref,
                        threads=torch.get_num_threads())


def train_trl(fx: Path, spec: dict, clock, args, trl_config: dict, bf16: bool,
              use_cpu: bool) -> None:
    """TRL's ``DPOTrainer`` on a fixture, the benchmark's shared settings plus ``trl_config``,
    timed by ``clock`` (``begin``, ``step_end``, ``batches`` with token counts)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.step_end()

    class CountingDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:  # copies where the batch is; count_trl_tokens reads them
                clock.batches.append({k: inputs[k].detach().clone()
                                      for k in ("attention_mask", "completion_mask")})
            return super().compute_loss(model, inputs, *a, **k)

    torch.manual_seed(args.seed)
    rows = [json.loads(line) for line in open(fx / "train.jsonl")]
    model = AutoModelForCausalLM.from_pretrained(fx / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(fx / "model")
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        dpo_args = DPOConfig(
            output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=total,
            max_length=spec["max_length"], learning_rate=5e-5, lr_scheduler_type="cosine",
            warmup_steps=max(1, int(0.1 * total)) if total >= 10 else 0, adam_beta1=0.9,
            adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
            bf16=bf16, use_cpu=use_cpu, logging_steps=10,
            save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
            dataloader_num_workers=0, disable_dropout=True, **trl_config)
        trainer = CountingDPOTrainer(model=model, args=dpo_args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tok, callbacks=[Timer()])
        trainer.train()


def trl_live_reference(trl_config: dict) -> bool:
    """Whether TRL runs with ``trl_config`` score the reference live (no precomputed
    reference log-probs)."""
    return not trl_config.get("precompute_ref_log_probs", False)


def count_trl_tokens(batches: list[dict]) -> None:
    """Per TRL batch (its masks, as :func:`train_trl` keeps them): ``tokens`` (real tokens,
    all of which its padded body runs) and ``scored`` (completion tokens)."""
    for b in batches:
        if "tokens" not in b:
            n = int(b["attention_mask"].sum())
            b.update(tokens=n, tokens_run=n, scored=int(b["completion_mask"][:, 1:].sum()))


def child_trl(args) -> dict:
    import torch

    fx, spec = Path(args.fixture_dir), FIXTURES[args.fixture]
    clock = _Clock()
    train_trl(fx, spec, clock, args, TRL_CONFIGS[args.config],
              bf16=args.precision == "bf16-mixed", use_cpu=True)
    count_trl_tokens(clock.batches)
    live_ref = trl_live_reference(TRL_CONFIGS[args.config])
    return clock.result(args.warmup, spec["batch"], live_reference=live_ref,
                        threads=torch.get_num_threads())


# ---- parent ----------------------------------------------------------------------------
def run_child(framework: str, config: str, fixture: str, fx: Path, precision: str,
              args) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--config", config,
           "--fixture", fixture, "--fixture-dir", str(fx), "--precisions", precision,
           "--steps", str(args.steps_for(fixture, precision)),
           "--warmup", str(args.warmup_for(fixture, precision)), "--seed", str(args.seed)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"!! {framework}/{config} {fixture} {precision} failed:\n{tail}", flush=True)
        return {"framework": framework, "config": config, "error": tail[-500:]}
    out = json.loads(lines[-1][len(RESULT):])
    out.update(framework=framework, config=config, wall_s=time.time() - started)
    print(f"   {framework:7s} {config:12s} {out['pairs'] / out['step_s']:7.2f} pairs/s  "
          f"{out['step_s']:7.2f} s/step  {out['peak_rss_mb']:7.0f} MB  setup {out['setup_s']:.0f} s"
          f"  {(out.get('page_faults_per_step') or 0) / 1000:.0f}k page faults/step", flush=True)
    return out


def _flops(run: dict, fixture: str) -> float:
    body, head = param_counts(fixture)
    f = 6 * body * run["tokens_run"] + 6 * head * run["scored"]
    if run["live_reference"]:
        f += 2 * body * run["tokens_run"] + 2 * head * run["scored"]
    return f


def data_flops(tokens: float, fixture: str, live_reference: bool) -> float:
    """Model FLOPs of a step in the usual MFU convention: 6·N·T with N every parameter
    (embedding included) and T the tokens of both sequences of every pair, all of which an
    implementation that scores each sequence whole runs through the body and the LM head;
    2·N·T more when the reference runs live. Issue 15's baseline MFU (22% for ptlight's
    packed step at 84–87 pairs/s, 350M shape, ~790 TFLOP/s) is this count; :func:`_flops`
    counts what ptlight's step computes instead (a shared prompt once, the LM head on the
    scored tokens only), so for a packed run it is about half."""
    body, head = param_counts(fixture)
    return (8 if live_reference else 6) * (body + head) * tokens


def summarize(fixture: str, precision: str, runs: list[dict], peak: float) -> dict:
    ok = [r for r in runs if "error" not in r]

    def best_of(framework):
        by_cfg: dict[str, list[dict]] = {}
        for r in ok:
            if r["framework"] == framework:
                by_cfg.setdefault(r["config"], []).append(r)
        stats = {}
        for cfg, rs in by_cfg.items():
            step = statistics.median(r["step_s"] for r in rs)
            rs0 = rs[0]
            stats[cfg] = {
                "pairs_per_s": rs0["pairs"] / step, "tokens_per_s": rs0["tokens"] / step,
                "step_s": step, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "setup_s": statistics.median(r["setup_s"] for r in rs),
                "flops_per_step": _flops(rs0, fixture),
                "mfu": _flops(rs0, fixture) / step / (peak * 1e9),
                "tokens_per_step": rs0["tokens"], "tokens_run_per_step": rs0["tokens_run"],
                "repeats": len(rs), "all_step_s": [r["step_s"] for r in rs],
                "page_faults_per_step": rs0.get("page_faults_per_step"),
            }
        return stats

    pt, trl = best_of("ptlight"), best_of("trl")
    rec = {"fixture": fixture, "precision": precision, "matmul_peak_gflops": peak,
           "ptlight": pt, "trl": trl}
    if "fast" in pt:
        p = pt["fast"]
        rec.update(ptlight_pairs_per_s=p["pairs_per_s"], ptlight_peak_rss_mb=p["peak_rss_mb"],
                   ptlight_tokens_per_s=p["tokens_per_s"], ptlight_step_s=p["step_s"],
                   ptlight_mfu=p["mfu"])
    if trl:
        name = max(trl, key=lambda c: trl[c]["pairs_per_s"])
        t = trl[name]
        rec.update(trl_best_config=name, trl_best_pairs_per_s=t["pairs_per_s"],
                   trl_best_peak_rss_mb=t["peak_rss_mb"], trl_best_tokens_per_s=t["tokens_per_s"],
                   trl_best_step_s=t["step_s"], trl_best_mfu=t["mfu"])
        if "fast" in pt:
            rec.update(speedup=rec["ptlight_pairs_per_s"] / t["pairs_per_s"],
                       rss_ratio=rec["ptlight_peak_rss_mb"] / t["peak_rss_mb"])
    return rec


def markdown(records: list[dict]) -> str:
    lines = ["| fixture | precision | run | pairs/s | tokens/s | s/step | peak RSS MB | "
             "setup s | MFU (of peak) |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for fw in ("ptlight", "trl"):
            for cfg, s in rec[fw].items():
                best = (fw == "trl" and cfg == rec.get("trl_best_config")) or (
                    fw == "ptlight" and cfg == "fast")
                name = f"{fw} {cfg}" + (" **(best)**" if fw == "trl" and best else "")
                lines.append(
                    f"| {rec['fixture']} | {rec['precision']} | {name} | {s['pairs_per_s']:.2f} | "
                    f"{s['tokens_per_s']:.0f} | {s['step_s']:.2f} | {s['peak_rss_mb']:.0f} | "
                    f"{s['setup_s']:.0f} | {100 * s['mfu']:.0f}% of "
                    f"{rec['matmul_peak_gflops']:.0f} GFLOP/s |")
        if "speedup" in rec:
            lines.append(
                f"| {rec['fixture']} | {rec['precision']} | **ptlight fast ÷ TRL best** | "
                f"**{rec['speedup']:.2f}×** | {rec['ptlight_tokens_per_s'] / rec['trl_best_tokens_per_s']:.2f}× | "
                f"{rec['ptlight_step_s'] / rec['trl_best_step_s']:.2f}× | "
                f"**{rec['rss_ratio']:.2f}×** | | |")
    return "\n".join(lines)


def profile(fx: Path, fixture: str, args) -> None:
    """Where a ptlight training step's time goes: plain path vs fast path (same batches)."""
    import torch

    from ptlight.model.backbone import build_policy, frozen_copy, load_tokenizer
    from ptlight.data.module import PtlDataModule
    from ptlight.engine.logps import completion_logps
    from ptlight.objectives import build_objective

    cfg = ptlight_cfg(fx, fixture, "32-true", [])
    model_cfg = cfg.model
    tok = load_tokenizer(model_cfg)
    dm = PtlDataModule(cfg.data, tok, "pairwise")
    dm.setup()
    batches = list(dm.ordered_loaders()["train"])[: args.warmup + args.steps]
    policy = build_policy(model_cfg, tok)
    ref = frozen_copy(policy)
    dpo = build_objective("dpo", {"beta": 0.1})
    from ptlight.objectives import Logps

    from ptlight.engine.lean import install_lean_mlp

    # before issue 5: padded rows, live reference, torch's default (per-tensor loop) AdamW on
    # CPU; after: packed + shared, precomputed reference, fused AdamW, lean LFM2 MLP (as
    # train_stage runs it by default)
    for label, pack, live_ref, fused in (
            ("plain (pack off, live reference, loop AdamW)", None, True, False),
            ("fast (pack on, precomputed reference, fused AdamW, lean MLP)", 2, False, True)):
        if fused:
            install_lean_mlp(policy)
        phases: dict[str, list[tuple[float, float]]] = {}
        opt = torch.optim.AdamW(policy.parameters(), lr=5e-5, betas=(0.9, 0.95),
                                weight_decay=0.0, fused=fused)

        def timed(name, fn):
            t, c = time.perf_counter(), time.process_time()
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out = fn()
            phases.setdefault(name, []).append((
                time.perf_counter() - t, time.process_time() - c,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f))
            return out

        for i, b in enumerate(batches):
            args_ = (b["input_ids"], b["attention_mask"], b["loss_mask"])
            if live_ref:
                def ref_fn():
                    with torch.no_grad():
                        return completion_logps(ref, *args_, with_diagnostics=False).sequence_sum()
                ref_sums = timed("reference forward", ref_fn)
            else:
                with torch.no_grad():  # precomputed before training: not part of the step
                    ref_sums = completion_logps(ref, *args_, with_diagnostics=False,
                                                pack=2).sequence_sum()
            if i == args.warmup:
                phases.clear()

            def fwd():
                s = completion_logps(policy, *args_, pack=pack)
                sums = s.sequence_sum()
                return dpo(Logps(policy=sums.view(2, -1).T, reference=ref_sums.view(2, -1).T,
                                 lengths=s.lengths().view(2, -1).T)).loss
            loss = timed("policy forward + loss", fwd)
            timed("backward", loss.backward)
            timed("clip + AdamW step", lambda: (torch.nn.utils.clip_grad_norm_(
                policy.parameters(), 1.0), opt.step(), opt.zero_grad()))
        wall = {k: statistics.median(w for w, _, _ in v) for k, v in phases.items()}
        cpu = {k: statistics.median(c for _, c, _ in v) for k, v in phases.items()}
        faults = {k: statistics.median(f for _, _, f in v) for k, v in phases.items()}
        print(f"\n{fixture} fp32, {label}: {sum(wall.values()):.2f} s/step wall, "
              f"{sum(cpu.values()):.2f} s CPU, {sum(faults.values()) / 1000:.0f}k page faults "
              f"(medians of {args.steps} steps)")
        for name in phases:
            print(f"  {name:24s} {wall[name]:6.2f} s wall {cpu[name]:6.2f} s CPU "
                  f"{100 * cpu[name] / sum(cpu.values()):4.0f}% of CPU "
                  f"{faults[name] / 1000:6.0f}k page faults")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--fixtures", default="bench,lfm2-350m")
    ap.add_argument("--precisions", default="32-true,bf16-mixed")
    ap.add_argument("--frameworks", default="ptlight,trl")
    ap.add_argument("--ptlight-configs", default="fast")
    ap.add_argument("--trl-configs", default=",".join(TRL_CONFIGS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default: 6; 2 for lfm2-350m and for bf16-mixed)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed first steps (default: 2; 1 for lfm2-350m and bf16-mixed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="phase timings of ptlight steps")
    ap.add_argument("--child", choices=["ptlight", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--fixture", help=argparse.SUPPRESS)
    ap.add_argument("--fixture-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    slow = lambda f, p: f == "lfm2-350m" or p == "bf16-mixed"  # noqa: E731
    args.steps_for = lambda f, p: args.steps or (2 if slow(f, p) else 6)
    args.warmup_for = lambda f, p: args.warmup if args.warmup is not None else (
        1 if slow(f, p) else 2)

    if args.child:
        args.steps, args.warmup, args.precision = (int(args.steps), int(args.warmup),
                                                   args.precisions)
        fn = child_ptlight if args.child == "ptlight" else child_trl
        print(RESULT + json.dumps(fn(args)), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixtures = args.fixtures.split(",")
    precisions = args.precisions.split(",")
    records = []
    for fixture in fixtures:
        n_rows = FIXTURES[fixture]["batch"] * (
            max(args.steps_for(fixture, p) + args.warmup_for(fixture, p) for p in precisions))
        fx = build_fixture(fixture, out / "fixtures", n_rows, args.seed)
        if args.profile:
            args.steps = args.steps or 3
            args.warmup = 1 if args.warmup is None else args.warmup
            profile(fx, fixture, args)
            continue
        for precision in precisions:
            peak = matmul_peak(precision)
            print(f"== {fixture} {precision}: matmul peak {peak:.1f} GFLOP/s, "
                  f"{args.repeats} repeat(s)", flush=True)
            plan = []
            if "ptlight" in args.frameworks:
                plan += [("ptlight", c) for c in args.ptlight_configs.split(",")]
            if "trl" in args.frameworks:
                plan += [("trl", c) for c in args.trl_configs.split(",")]
            runs = []
            for rep in range(args.repeats):
                for framework, config in (plan if rep % 2 == 0 else plan[::-1]):
                    runs.append(run_child(framework, config, fixture, fx, precision, args))
            rec = summarize(fixture, precision, runs, peak)
            rec["runs"] = runs
            records.append(rec)
            (out / "bench.json").write_text(json.dumps(records, indent=1))
            (out / "bench.md").write_text(markdown(records) + "\n")
    if records:
        print("\n" + markdown(records))
        print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
