"""``trainer=fsdp`` (torch's FSDP2 through ptlight.runtime.strategy.FSDPStrategy): strategy options,
and every method training, clipping gradients by norm, checkpointing sharded, resuming and
exporting completely — on CPU processes (gloo) in CI, and on a CUDA GPU in bf16-mixed where one
is visible (``gpu`` marker)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import REPO, TINY, run_cli, tiny_model_cfg
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.errors import ConfigError
from ptlight.runtime.strategy import FSDPStrategy, build_strategy, decoder_layer_classes, multiprocess


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_model_cfg()
    return build_policy(cfg, load_tokenizer(cfg))


def test_fsdp_shards_the_decoder_layers_with_sharded_checkpoints(compose_cfg, tiny):
    cfg = compose_cfg("trainer=fsdp")
    rest, extra = build_strategy(cfg.trainer, tiny)
    strategy = extra["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert {c.__name__ for c in strategy.layer_classes} == {"Lfm2DecoderLayer"}
    assert not strategy.activation_checkpointing and strategy.reshard_after_forward
    assert strategy._save_distributed_checkpoint and not strategy.cpu_offload
    assert "strategy" not in rest and rest.accelerator == "auto" and rest.precision == "auto"
    assert multiprocess(cfg.trainer) == (torch.cuda.device_count() > 1)  # auto: every GPU
    assert multiprocess(compose_cfg("trainer=fsdp", "trainer.devices=2").trainer)


def test_fsdp_options_come_from_config_and_bad_values_are_refused(compose_cfg, tiny):
    cfg = compose_cfg("trainer=fsdp",
                      "trainer.strategy.activation_checkpointing_policy=decoder_layers",
                      "trainer.strategy.sharding_strategy=SHARD_GRAD_OP",
                      "trainer.strategy.state_dict_type=full", "trainer.strategy.cpu_offload=true")
    strategy = build_strategy(cfg.trainer, tiny)[1]["strategy"]
    assert strategy.activation_checkpointing and not strategy.reshard_after_forward
    assert not strategy._save_distributed_checkpoint and strategy.cpu_offload
    for override, key in [("trainer.strategy.auto_wrap_policy=layers", "auto_wrap_policy='layers'"),
                          ("trainer.strategy.sharding_strategy=HALF", "sharding_strategy='HALF'"),
                          ("trainer.strategy.state_dict_type=zip", "state_dict_type='zip'")]:
        with pytest.raises(ConfigError, match=rf"trainer\.strategy\.{key}"):
            build_strategy(compose_cfg("trainer=fsdp", override).trainer, tiny)


@pytest.mark.parametrize("model_type,layer", [("llama", "LlamaDecoderLayer"),
                                              ("qwen2", "Qwen2DecoderLayer"),
                                              ("gpt2", "GPT2Block")])
def test_any_hf_causal_lm_is_wrapped_by_its_no_split_modules(model_type, layer):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    if model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {layer}


def test_rank0_validation_samples_are_off_under_multi_process_fsdp(compose_cfg):
    from ptlight.runtime.strategy import fsdp_without_rank0_generation

    assert fsdp_without_rank0_generation(compose_cfg("trainer=fsdp", "trainer.devices=2")
                                         .trainer)
    assert not fsdp_without_rank0_generation(compose_cfg("trainer=fsdp", "trainer.devices=1")
                                             .trainer)
    assert not fsdp_without_rank0_generation(compose_cfg("trainer=ddp").trainer)


def test_a_model_without_decoder_layer_names_is_refused(compose_cfg):
    with pytest.raises(ConfigError, match=r"names no decoder layer class"):
        build_strategy(compose_cfg("trainer=fsdp").trainer, torch.nn.Linear(2, 2))


def test_fsdp_with_lora_is_refused_before_training(compose_cfg):
    cfg = tiny_model_cfg()
    cfg.lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None,
                "quantize": None, "merge": False}
    policy = build_policy(cfg, load_tokenizer(cfg))
    with pytest.raises(ConfigError, match=r"trainer=fsdp with model\.lora\.enabled=true"):
        build_strategy(compose_cfg("trainer=fsdp").trainer, policy)


def test_other_strategies_pass_through(compose_cfg, tiny):
    cfg = compose_cfg("trainer=ddp")
    assert build_strategy(cfg.trainer, tiny) == (cfg.trainer, {})


# ---- end to end: every method under FSDP ---------------------------------------------------
HEADS = {"rm": "reward_head.safetensors", "ppo": "value_head.safetensors"}


def _train_resume_export(tmp_path, method: str, *extra: str) -> dict:
    """Train 2 steps (checkpoint at 2) with gradient clipping by norm at 1.0 (the default),
    resume to 3, and check the sharded checkpoint and the complete export."""
    run_dir = tmp_path / method
    args = [*TINY, f"method={method}", "trainer=fsdp", "eval.before=false",
            "eval.val_samples=0", "checkpoint.every_n_train_steps=2", "trainer.max_steps=2",
            "trainer.gradient_clip_val=1.0", f"hydra.run.dir={run_dir}", *extra]
    out = run_cli(*args, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and list(ckpt.glob("*.distcp"))  # sharded: a directory of shards
    out = run_cli(*args, "trainer.max_steps=3", "ckpt_path=last", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restored all states" in out.stderr + out.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    # on failure, the logged metrics say which terms went non-finite first
    assert report["skipped_steps"] == 0, (run_dir / "metrics.csv").read_text()[-4000:]
    # ppo: one rollout batch makes num_ppo_epochs x num_mini_batches optimiser steps
    assert report["global_step"] == 3 if method != "ppo" else report["global_step"] >= 3
    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    start = AutoModelForCausalLM.from_config(model.config)
    assert set(model.state_dict()) == set(start.state_dict())  # complete, plain keys
    if method in HEADS:  # the head is exported whole, not one rank's shard
        head = load_file(str(export / HEADS[method]))
        assert head["weight"].shape == (1, model.config.hidden_size)
        assert torch.isfinite(head["weight"]).all()
    return report


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "rm", "ppo", "grpo"])
def test_every_method_trains_clips_checkpoints_resumes_and_exports_under_fsdp_on_cpu(
        tmp_path, method):
    report = _train_resume_export(tmp_path, method, "trainer.accelerator=cpu")
    assert report["world_size"] == 1
    if method == "rm":
        assert 0.0 <= report["heldout"]["rm/accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_fsdp_shards_over_two_cpu_processes(tmp_path, method):
    report = _train_resume_export(tmp_path, method, "trainer.accelerator=cpu",
                                  "trainer.devices=2")
    assert report["world_size"] == 2
    shards = list((tmp_path / method / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert len(shards) == 2  # one per rank


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "rm", "grpo", "ppo"])
def test_every_method_under_fsdp_on_gpu_in_bf16(tmp_path, method):
    # validation after every step: training continues after a no-grad pass of the roots
    report = _train_resume_export(tmp_path, method, "trainer.precision=bf16-mixed",
                                  "trainer.val_check_interval=1")
    assert report["world_size"] == torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_norms_train_under_fsdp_on_gpu_in_bf16(tmp_path):
    """``model.fused_norm`` under FSDP2's bf16 mixed precision (norm weights gathered in bf16
    inside their units) trains, clips, checkpoints, resumes and exports like the stock norms."""
    report = _train_resume_export(tmp_path, "dpo", "trainer.precision=bf16-mixed",
                                  "model.fused_norm=true")
    assert report["world_size"] == torch.cuda.device_count()


@pytest.mark.slow
def test_bench_gpu_smoke_runs_on_cpu_and_writes_its_tables(tmp_path):
    """``scripts/bench_gpu.py --device cpu --fixture tiny``: the GPU benchmark's own code path
    (fixture, ptlight and TRL children, summary against TRL's best, json + markdown) without a
    GPU; ``--budget`` stops starting runs and lists them as skipped."""
    import subprocess
    import sys

    def bench(out_dir, *extra):
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--device", "cpu",
             "--fixture", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out_dir),
             *extra], capture_output=True, text=True, timeout=600)

    out = bench(tmp_path / "all", "--ptlight", "default,precompute_pack_compile", "--trl", "best",
                "--profile", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "all" / "bench_gpu.json").read_text())["records"][0]
    run = rec["runs"]["ptlight default"]
    assert run["pairs_per_s"] > 0 and 0 < run["mfu"] < 1 and run["flops_per_step"] > 0
    # data MFU: 6·N·T over every parameter and both sequences of every pair, so never below
    # the MFU of what the run computes (the same for TRL's padded rows but for the LM head,
    # which the count runs on every token)
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_dpo

    for r in (run, rec["runs"]["trl best"]):
        passes = 8 if r["live_reference"] else 6  # a live reference's forward: 2·N·T more
        assert r["mfu_data"] == pytest.approx(
            passes * sum(bench_dpo.param_counts("tiny")) * r["tokens_per_s"]
            / (rec["matmul_peak_tflops"] * 1e12))
        assert r["mfu_data"] > r["mfu"]
    # scripts/data_mfu.py reads the same figure back from the file (and from files written
    # before bench_gpu.py recorded it)
    import data_mfu

    read = {r["run"]: r for r in data_mfu.rows(tmp_path / "all" / "bench_gpu.json")}
    assert read["ptlight default"]["data_mfu"] == pytest.approx(run["mfu_data"])
    # an older file's run does not say whether its reference ran live: its configuration does
    assert [data_mfu.live_reference(name, {}) for name in (
        "ptlight default", "ptlight copy", "trl best", "trl default")] == [False, True, False, True]
    # --profile: more steps after the timed ones, profiled into a table; the timing is unchanged
    assert run["steps"] == 3 and len(run["step_times"]) == 2  # 1 warm-up + 2 timed
    # --limit: a run started late gets only what is left of the plan's 8 minutes
    import bench_gpu

    assert bench_gpu.run_timeout_s(150, 470, 400) == 70
    assert bench_gpu.run_timeout_s(150, 470, 10) == 150 and bench_gpu.run_timeout_s(150, 470, 500) == 1
    profile = (tmp_path / "all" / "profile_tiny_default.txt").read_text()
    assert profile.startswith("profiled steps: 2; wall per step:") and "aten::mm" in profile
    assert "scalar read-backs per step (aten::_local_scalar_dense):" in profile
    # ... named by the Python line that called them (on the CPU: fused AdamW's own kernel,
    # called from Lightning's optimizer step)
    assert "from lightning/pytorch/plugins/precision/precision.py" in profile
    # the host's time by the Python line that called the ops: the scoring's own lines among them
    by_source = profile.split("by the Python line that called them")[1]
    assert "ptlight/engine/" in by_source and "(no Python frame)" not in by_source.split("\n")[1]
    # what torch.compile did: nothing in the eager run; the compiled packed step compiled
    # without a graph break
    assert run["compile"]["unique_graphs"] == 0
    compiled = rec["runs"]["ptlight precompute_pack_compile"]["compile"]
    assert compiled["unique_graphs"] > 0 and compiled["graph_breaks"] == 0
    # the matmuls' own time at the run's shapes, and the MFU that time alone would allow (both
    # are timings, so how they compare with the step's is for the GPU table, not for a test)
    for name in ("ptlight default", "trl best"):
        r = rec["runs"][name]
        assert r["gemm_bound_s"] > 0
        assert r["gemm_bound_mfu"] == pytest.approx(r["mfu"] * r["step_s"] / r["gemm_bound_s"])
    assert rec["trl_best"] == "trl best"
    assert set(rec["vs_trl_best"]) == {"ptlight default", "ptlight precompute_pack_compile"}
    assert rec["speedup"] == rec["vs_trl_best"]["ptlight default"]["speedup"] > 0
    table = (tmp_path / "all" / "bench_gpu.md").read_text()
    assert "| tiny | ptlight default |" in table and "**ptlight default ÷ trl best**" in table
    out = bench(tmp_path / "none", "--ptlight", "default", "--trl", "", "--budget", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| tiny | ptlight default | skipped |" in (tmp_path / "none" / "bench_gpu.md").read_text()


# ---- the RL scoring's checkpointed LM-head chunks under FSDP2 -------------------------------
def _scores_on_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from helpers import tiny_chat_policy
    from ptlight.engine import logps as logps_mod
    from ptlight.methods.ppo import token_scores

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        got = {}
        for name, limit in (("one_block", 1 << 60), ("checkpointed", 0)):
            logps_mod.HEAD_CHECKPOINT_BYTES = limit
            policy, _ = tiny_chat_policy()  # same seed: the same weights on every rank
            for layer in policy.model.layers:
                fully_shard(layer, reshard_after_forward=True)
            fully_shard(policy, reshard_after_forward=False)  # as ptlight shards the root
            ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(rank))
            logps, _, _ = token_scores(policy, ids, torch.ones_like(ids), 5, 0.7)
            (logps * torch.linspace(-1, 1, 14).view(2, 7)).sum().backward()
            got[name] = (logps.detach(), {n: p.grad.full_tensor() for n, p in
                                          policy.named_parameters()})
        results[rank] = got
        dist.barrier()  # no rank tears its group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_rl_scoring_recomputes_its_head_chunks_under_fsdp_on_two_cpu_processes():
    """Past ``HEAD_CHECKPOINT_BYTES`` the RL scoring checkpoints its LM-head chunks, so the
    backward runs the head again on the root unit's weight: under FSDP2 (two gloo processes,
    the layers and the root sharded as ptlight shards them) the log-probs and every gathered
    gradient equal the one-block scoring's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # no fork of this multi-threaded worker
    mp.spawn(_scores_on_rank, args=(2, port, results), nprocs=2, join=True)
    for rank in (0, 1):
        (lp_a, grads_a), (lp_b, grads_b) = results[rank]["one_block"], results[rank]["checkpointed"]
        torch.testing.assert_close(lp_b, lp_a)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5)
