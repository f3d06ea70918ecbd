"""Config values checked before anything loads: each bad value is a
:class:`~ptlight.errors.ConfigError` that names the key and says what to write instead.

Hydra composes whatever a command line or YAML file gives, so ``data.batch_size=abc`` or
``model.trust_remote_code="false"`` (a string, as from an environment variable or quoted YAML)
reach the code as they are. :func:`check_config` runs first in
:func:`ptlight.train.train_stage`; without it they would fail (or, worse, pass: any non-empty
string is truthy) only after the weights have loaded.

Checked here: security flags (real booleans only), ``seed``, ``data.batch_size``,
``data.max_length``, ``data.val_size``, ``data.num_workers``, ``method.optim`` (``lr``,
``weight_decay``, ``betas``, ``warmup_ratio``, ``scheduler``), ``trainer.max_steps``,
``accumulate_grad_batches``, ``gradient_clip_val``, ``val_check_interval`` and
``log_every_n_steps``, ``checkpoint.every_n_train_steps``,
``model.compile`` and ``model.compile_mode``, ``model.fused_norm``, ``model.fuse_projections``,
``model.packed_attention``, the packing keys, and the ``eval`` counts and generation settings.
``trainer.precision``/``accelerator``/``devices`` are checked where the trainer is set up
(:mod:`ptlight.runtime.strategy`, :mod:`ptlight.engine.cpu_bf16`); each method checks its
own keys in its ``extra_args``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

from ptlight.errors import ConfigError

# Keys that, when true, let a file or a remote party run code or reach past a safety check.
# Anywhere in the config tree (model, judge, reward, ...) they take a YAML boolean and nothing
# else: "false" or "no" as a string is truthy in Python and would turn the check off.
SECURITY_FLAG = re.compile(r"^(trust_remote_code|allow_\w+)$")

# transformers.get_scheduler names that build from warmup + total steps alone and step without
# a monitored metric (reduce_lr_on_plateau and greedy need one; cosine_with_min_lr,
# cosine_warmup_with_min_lr and warmup_stable_decay need extra arguments ptlight does not pass).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt")

# The largest seed every generator Lightning seeds takes (numpy's: 32 bits).
MAX_SEED = 2**32 - 1

# One prompt token plus one completion token: the least a row can be cut down to.
MIN_MAX_LENGTH = 2


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, resolved value) of every leaf; values whose interpolation does not resolve
    here (Hydra's own ``${hydra:...}``) are skipped."""
    items = (node.items_ex(resolve=False) if isinstance(node, DictConfig)
             else enumerate(node))
    for key, _ in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        try:
            value = node[key]
        except Exception:  # an interpolation only Hydra's runtime resolves
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _walk(value, path)
        else:
            yield path, value


def check_security_flags(cfg: DictConfig) -> None:
    """Every ``trust_remote_code`` / ``allow_*`` key in the tree is a real boolean."""
    for path, value in _walk(cfg, ""):
        name = path.rsplit(".", 1)[-1]
        if SECURITY_FLAG.match(name) and not isinstance(value, bool):
            raise ConfigError(
                f"{path}={value!r} ({type(value).__name__}): this security setting takes a "
                f"boolean only, written unquoted: {path}=false (the default) or {path}=true. A "
                "string such as 'false' or 'no' is not accepted, because any non-empty string "
                "would count as true."
            )


def whole_number(value: Any, key: str, least: int, what: str) -> int:
    """``value`` as an int >= ``least``, or a ConfigError naming ``key``, saying ``what`` it
    is and giving an example."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key}={value!r}: {what}; write a whole number >= {least}, "
                          f"e.g. {key}={max(least, 8)}")
    return value


def finite_number(value: Any, key: str, low: float, high: float | None, low_open: bool,
                  what: str, example: str) -> float:
    """``value`` as a finite float above ``low`` (``low_open``) or from ``low``, up to
    ``high`` (None: unbounded; ``low=-math.inf``: any finite number), or a ConfigError naming
    ``key``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = "" if math.isinf(low) else (f" > {low}" if low_open else f" >= {low}")
        bound += f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{key}={value!r}: {what} must be a finite number{bound}; "
                          f"e.g. {key}={example}")
    return float(value)


def check_data(data: DictConfig) -> None:
    whole_number(data.batch_size, "data.batch_size", 1, "examples per device per step")
    whole_number(data.max_length, "data.max_length", MIN_MAX_LENGTH,
                 "tokens of prompt + completion; a row needs at least one of each")
    if data.get("task") is not None and data.get("path") is None:
        whole_number(data.get("num_train"), "data.num_train", 1,
                     "training rows the task generates")
    if data.get("val_path") is None:
        whole_number(data.val_size, "data.val_size", 1,
                     "rows held out for validation (or set data.val_path=<file>)")
    if data.get("num_workers", 0) != "auto":
        whole_number(data.get("num_workers", 0), "data.num_workers", 0,
                     "DataLoader worker processes (0: collate in the main process; auto: 2 where a "
                     "CUDA step packs, else 0)")
    boolean(data.get("pin_memory", False), "data.pin_memory",
            "whether the DataLoader pins batches in page-locked memory for the copy to a GPU")


def boolean(value: Any, key: str, what: str) -> bool:
    """``value`` when it is a real boolean, else a ConfigError naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: {what}; write {key}=true or {key}=false (unquoted)")
    return value


def check_eval(ev: DictConfig, training: bool = True) -> None:
    """The ``eval`` keys a training run (``training``) or ``python -m ptlight.eval`` reads:
    counts, generation settings. ``eval.num_prompts=0`` skips the gold evaluation."""
    whole_number(ev.num_prompts, "eval.num_prompts", 0,
                 "held-out prompts the gold evaluation generates for (0: no gold evaluation)")
    whole_number(ev.batch_size, "eval.batch_size", 1, "prompts generated for at once")
    whole_number(ev.max_new_tokens, "eval.max_new_tokens", 1,
                 "tokens generated per prompt at most")
    whole_number(ev.num_samples, "eval.num_samples", 0,
                 "generations kept in eval.json and samples.jsonl")
    whole_number(ev.num_pairs, "eval.num_pairs", 0,
                 "held-out pairs for preference accuracy (0: none)")
    whole_number(ev.seed, "eval.seed", 0, "the seed of the held-out prompts and of sampling")
    if boolean(ev.do_sample, "eval.do_sample", "greedy (false) or sampled (true) generation"):
        finite_number(ev.temperature, "eval.temperature", 0.0, None, True,
                      "the sampling temperature (eval.do_sample=true)", "1.0")
    acc = ev.get("acceptance") or {}
    if "threshold" in acc:
        finite_number(acc.threshold, "eval.acceptance.threshold", -math.inf, None, True,
                      "the score at or above which a generation counts as accepted", "1.0")
    if not training and acc.get("path"):
        whole_number(acc.num_prompts, "eval.acceptance.num_prompts", 1,
                     "rows of eval.acceptance.path to evaluate")
    if training:
        boolean(ev.before, "eval.before", "whether the starting model is evaluated too")
        whole_number(ev.val_samples, "eval.val_samples", 0,
                     "held-out prompts generated at every validation (0: off)")


def check_optim(optim: DictConfig) -> None:
    finite_number(optim.lr, "method.optim.lr", 0.0, None, True, "the learning rate", "5e-5")
    finite_number(optim.weight_decay, "method.optim.weight_decay", 0.0, None, False,
                  "the weight decay", "0.0")
    finite_number(optim.warmup_ratio, "method.optim.warmup_ratio", 0.0, 1.0, False,
                  "the share of steps spent warming up", "0.1")
    betas = optim.betas
    if not isinstance(betas, ListConfig) or len(betas) != 2:
        raise ConfigError(f"method.optim.betas={betas!r}: AdamW takes two numbers, "
                          "e.g. method.optim.betas=[0.9,0.95]")
    for i, beta in enumerate(betas):
        finite_number(beta, f"method.optim.betas[{i}]", 0.0, 1.0, False, "an AdamW beta", "0.9")
        if beta == 1.0:
            raise ConfigError(f"method.optim.betas[{i}]=1.0: an AdamW beta must be below 1, "
                              "e.g. method.optim.betas=[0.9,0.95]")
    if optim.scheduler not in SCHEDULERS:
        raise ConfigError(f"method.optim.scheduler={optim.scheduler!r} is not a schedule "
                          f"ptlight can run; use one of {', '.join(SCHEDULERS)}")


def check_trainer(trainer: DictConfig) -> None:
    whole_number(trainer.get("accumulate_grad_batches", 1), "trainer.accumulate_grad_batches", 1,
                 "batches whose gradients make one optimiser step")
    clip = trainer.get("gradient_clip_val")
    if clip is not None:  # Lightning skips clipping at <= 0: a negative value would look set
        finite_number(clip, "trainer.gradient_clip_val", 0.0, None, False,
                      "the gradient clipping threshold (0 or null: no clipping)", "1.0")
    whole_number(trainer.get("log_every_n_steps", 50), "trainer.log_every_n_steps", 0,
                 "optimiser steps between logged training metrics (0: none)")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (
            isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1
            or isinstance(interval, float) and 0.0 < interval <= 1.0):
        raise ConfigError(f"trainer.val_check_interval={interval!r}: validate every N training "
                          "steps (a whole number >= 1, e.g. trainer.val_check_interval=50) or at "
                          "a fraction of each epoch (a number in (0, 1], e.g. 0.25)")
    steps = trainer.get("max_steps")
    epochs = trainer.get("max_epochs")
    if steps == -1 and isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
        return  # Lightning: run trainer.max_epochs epochs
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"trainer.max_steps={steps!r}: the number of optimiser steps, a whole number >= 1 "
            "(the learning-rate schedule needs a finite length); e.g. trainer.max_steps=100, or "
            "trainer.max_steps=-1 together with trainer.max_epochs=<N>"
        )


def check_config(cfg: DictConfig) -> None:
    """Every check above, on one stage's composed config (``method`` set)."""
    check_security_flags(cfg)
    seed = whole_number(cfg.get("seed", 0), "seed", 0, "the run's random seed")
    if seed > MAX_SEED:
        raise ConfigError(f"seed={seed}: numpy's random generator takes seeds up to {MAX_SEED}; "
                          "write a smaller whole number, e.g. seed=0")
    check_data(cfg.data)
    check_optim(cfg.method.optim)
    check_trainer(cfg.trainer)
    check_model(cfg.model)
    check_graphs_without_accumulation(cfg.model, cfg.trainer)
    check_fused_projections(cfg.model, cfg.trainer)
    check_eval(cfg.eval)
    if "checkpoint" in cfg:
        whole_number(cfg.checkpoint.get("every_n_train_steps", 0),
                     "checkpoint.every_n_train_steps", 0,
                     "optimiser steps between checkpoints (0: at each epoch's end only)")
    if "pack" in cfg.method:  # the preference methods' packing keys
        check_pack(cfg.method.pack, cfg.method.get("pack_max_tokens", 2048),
                   cfg.method.get("pack_multiple_of", 1))


def check_fused_projections(model: DictConfig, trainer: DictConfig) -> None:
    """``model.fuse_projections=true`` where it does not apply: with ``model.compile`` (inductor
    plans a compiled layer's matmuls) or ``trainer=fsdp`` (FSDP gathers the weights itself)."""
    from ptlight.runtime.strategy import is_fsdp

    if model.get("fuse_projections") is not True:
        return
    if model.get("compile"):
        raise ConfigError(f"model.fuse_projections=true with model.compile={model.compile}: "
                          "compiled layers plan their own matmuls; use model.fuse_projections=auto "
                          "(off when compiling) or false, or model.compile=false")
    if is_fsdp(trainer.get("strategy")):
        raise ConfigError("model.fuse_projections=true with trainer=fsdp: FSDP gathers and casts "
                          "the weights itself; use model.fuse_projections=auto (off under FSDP) "
                          "or false")


def check_graphs_without_accumulation(model: DictConfig, trainer: DictConfig) -> None:
    """A ``model.compile_mode`` that records CUDA graphs, with gradient accumulation: refused.
    Each micro-batch's backward ends a CUDA-graph generation, the next micro-batch's graphs
    may reuse its outputs' memory, and whether the gradients accumulated in ``.grad`` survive
    that is untested."""
    from ptlight.engine.compile import GRAPH_MODES

    mode = model.get("compile_mode", "default")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if mode in GRAPH_MODES and int(accumulate or 1) > 1:
        raise ConfigError(f"model.compile_mode={mode} records CUDA graphs, which ptlight has "
                          "not verified with gradient accumulation "
                          f"(trainer.accumulate_grad_batches={accumulate}): use "
                          "model.compile_mode=default, or trainer.accumulate_grad_batches=1 "
                          "with a larger data.batch_size")


def check_pack(pack: Any, max_tokens: Any, multiple_of: Any) -> None:
    if pack not in (True, False, "auto"):
        raise ConfigError(f"method.pack={pack!r}; use auto, true or false")
    whole_number(max_tokens, "method.pack_max_tokens", 2, "tokens per packed row")
    if multiple_of == "auto":
        return
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or not (
            1 <= multiple_of <= max_tokens):
        raise ConfigError(f"method.pack_multiple_of={multiple_of!r}: use auto, or 1 (no "
                          f"rounding) up to method.pack_max_tokens={max_tokens}")


def check_model(model: DictConfig) -> None:
    fused_norm = model.get("fused_norm", False)
    if fused_norm != "auto" and not isinstance(fused_norm, bool):
        raise ConfigError(f"model.fused_norm={fused_norm!r}: whether RMSNorm layers run as "
                          "torch's fused F.rms_norm; write model.fused_norm=auto (on where the "
                          "run trains on CUDA), true or false (unquoted)")
    fuse = model.get("fuse_projections", False)
    if fuse != "auto" and not isinstance(fuse, bool):
        raise ConfigError(f"model.fuse_projections={fuse!r}: whether sibling projections (q/k/v, "
                          "the MLP's w1/w3) run as one matmul while training; write "
                          "model.fuse_projections=auto (on where the run trains on CUDA a model up to "
                          "1024 wide), true or false (unquoted)")
    attention = model.get("packed_attention", "sdpa")
    if attention not in ("sdpa", "flex"):
        raise ConfigError(f"model.packed_attention={attention!r}: the attention of packed "
                          "scoring; use sdpa (a dense tree mask) or flex (FlexAttention with a "
                          "block-sparse mask, CUDA only)")
    compile_ = model.get("compile", False)
    if not isinstance(compile_, bool) and compile_ != "packed":
        raise ConfigError(f"model.compile={compile_!r}: use model.compile=true (torch.compile "
                          "the norms and MLPs of every decoder layer), packed (only whole layers "
                          "in the preference methods' packed scoring) or false")
    from ptlight.engine.compile import MODES

    mode = model.get("compile_mode", "default")
    if mode not in MODES:
        raise ConfigError(f"model.compile_mode={mode!r}: torch.compile's mode for "
                          f"model.compile; use one of {', '.join(MODES)}")
    if mode != "default" and not compile_:
        raise ConfigError(f"model.compile_mode={mode} is the mode of model.compile, which is "
                          "false: set model.compile=true (or packed), or leave "
                          "model.compile_mode=default")
    if compile_ == "packed" and model.get("gradient_checkpointing"):
        raise ConfigError("model.compile=packed compiles whole layers in packed scoring, which "
                          "gradient checkpointing's recomputation cannot run, so nothing would "
                          "compile: use model.compile=true (the norms and MLPs) with "
                          "model.gradient_checkpointing=true, or turn checkpointing off")


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys a list of Hydra overrides sets or deletes (``+``, ``++`` and ``~``
    prefixes dropped; ``group=option`` choices included as their group name)."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.add(key.replace("/", "."))
    return keys


def written_keys(overrides: list[str] | None, node: str) -> set[str] | None:
    """Keys directly under ``node`` (e.g. ``method.objective``) that ``overrides`` name, or
    None when unknown (no overrides given) or when the node itself is replaced whole."""
    if overrides is None:
        return None
    keys = override_keys(overrides)
    if node in keys:
        return None
    prefix = node + "."
    return {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}


def check_overrides(cfg: DictConfig, overrides: list[str] | None) -> None:
    """Settings the user wrote that would have no effect: ``model.lora.*`` while LoRA is off
    (``model.lora.r=8`` alone would otherwise train every weight, silently)."""
    if not overrides:
        return
    lora = cfg.model.get("lora")
    if lora is not None and not lora.get("enabled", False):
        written = sorted(k for k in override_keys(overrides)
                         if k.startswith("model.lora.") and k != "model.lora.enabled")
        if written:
            raise ConfigError(
                f"{', '.join(written)} set while LoRA is off (model.lora.enabled=false), so "
                "every weight would train and the setting would do nothing; add "
                "model.lora.enabled=true (or drop the setting)")
