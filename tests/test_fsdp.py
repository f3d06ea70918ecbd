"""``trainer=fsdp``: strategy construction on CPU (Lightning and torch's FSDP need a GPU to
run), and one GPU-marked run that trains, checkpoints sharded, resumes and exports."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import REPO, TINY, run_cli, tiny_model_cfg
from ptlight.backbone import build_policy, load_tokenizer
from ptlight.errors import ConfigError
from ptlight.strategy import (ShardReference, build_strategy, decoder_layer_classes,
                              full_policy_state, multiprocess)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_model_cfg()
    return build_policy(cfg, load_tokenizer(cfg))


def _classes(policy) -> set[str]:
    return {c.__name__ for c in policy._module_classes}


def test_fsdp_wraps_the_decoder_layers_with_bf16_and_sharded_checkpoints(compose_cfg, tiny):
    cfg = compose_cfg("trainer=fsdp")
    rest, extra = build_strategy(cfg.trainer, tiny)
    strategy = extra["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert _classes(strategy.kwargs["auto_wrap_policy"]) == {"Lfm2DecoderLayer"}
    assert strategy._activation_checkpointing_kwargs == {}
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    assert "strategy" not in rest and rest.precision == "bf16-mixed" and rest.accelerator == "gpu"
    assert multiprocess(cfg.trainer) == (torch.cuda.device_count() > 1)  # devices=-1: every GPU
    assert multiprocess(compose_cfg("trainer=fsdp", "trainer.devices=2").trainer)


def test_activation_checkpointing_and_other_options_come_from_config(compose_cfg, tiny):
    cfg = compose_cfg("trainer=fsdp",
                      "trainer.strategy.activation_checkpointing_policy=decoder_layers",
                      "trainer.strategy.sharding_strategy=SHARD_GRAD_OP",
                      "trainer.strategy.state_dict_type=full")
    strategy = build_strategy(cfg.trainer, tiny)[1]["strategy"]
    ckpt = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert _classes(ckpt) == {"Lfm2DecoderLayer"}
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert strategy._state_dict_type == "full"
    with pytest.raises(ConfigError, match=r"trainer\.strategy\.auto_wrap_policy='layers'"):
        build_strategy(compose_cfg("trainer=fsdp", "trainer.strategy.auto_wrap_policy=layers")
                       .trainer, tiny)


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


def test_rank0_validation_samples_are_off_under_multi_gpu_fsdp(compose_cfg):
    from ptlight.strategy import fsdp_without_rank0_generation

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


def test_other_strategies_pass_through_and_fsdp_helpers_are_no_ops(compose_cfg, tiny):
    import lightning as L

    cfg = compose_cfg("trainer=ddp")
    assert build_strategy(cfg.trainer, tiny) == (cfg.trainer, {})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)

    class Holder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self._reference = [torch.nn.Linear(2, 2)]

    module = Holder()
    ShardReference().on_fit_start(trainer, module)
    assert type(module._reference[0]) is torch.nn.Linear  # left as is without FSDP
    assert full_policy_state(trainer, module) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA device")
def test_fsdp_trains_checkpoints_sharded_resumes_and_exports_on_gpu(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "method=dpo", "trainer=fsdp", "trainer.devices=1", "eval.before=false",
            "eval.val_samples=0", "checkpoint.every_n_train_steps=2", "trainer.max_steps=4",
            f"hydra.run.dir={run_dir}"]
    out = run_cli(*args, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir()  # sharded: a directory of shards
    out = run_cli(*args, "trainer.max_steps=6", "ckpt_path=last", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["global_step"] == 6
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert all(torch.isfinite(p).all() for p in model.parameters())
