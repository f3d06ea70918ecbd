"""``model.fuse_projections``: q/k/v and w1/w3 as one matmul each compute what the stock
projections do (within floating-point tolerance), in fewer matmuls, only while training; the
config key resolves and is checked before any weights load."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (TINY, assert_same_scores_and_grads, dpo_losses, pair_batch,
                     scores_and_grads, tiny_model_cfg)
from ptlight.engine.fused_proj import (AUTO_MAX_HIDDEN_SIZE, auto_fuses, fusable,
                                       install_fused_projections)
from ptlight.engine.lean import install_lean_mlp
from ptlight.errors import ConfigError
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.train import train_stage


class _Matmuls(TorchDispatchMode):
    """How many matmuls were dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _pair(device: str = "cpu", **model_cfg):
    """A lean stock model and its copy with fused projections (the training policy as
    ``train_stage`` sets it up), on ``device``."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg(**model_cfg)
    stock = build_policy(cfg, load_tokenizer(cfg)).to(device)
    install_lean_mlp(stock)
    fused = copy.deepcopy(stock)
    assert install_fused_projections(fused) == 1 + 3  # one attention layer, three MLPs
    assert install_fused_projections(fused) == 4  # idempotent
    return stock, fused


def _args(seed: int = 0, device: str = "cpu"):
    b = pair_batch(14, seed)
    return tuple(b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))


@pytest.mark.parametrize("pack", [None, 2], ids=["padded", "packed"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_fused_projections_give_the_stock_scores_and_gradients_in_fp32(pack, checkpointing):
    """Also under gradient checkpointing, whose recomputation fuses again."""
    stock, fused = _pair(gradient_checkpointing=checkpointing)
    if checkpointing:
        stock.train(), fused.train()  # transformers recomputes only in training mode
    args = _args()
    assert_same_scores_and_grads(scores_and_grads(fused, args, pack=pack),
                                 scores_and_grads(stock, args, pack=pack), 1e-5, 1e-4)


def _under_bf16_autocast(device: str, monkeypatch) -> None:
    """Under bf16 autocast the fused model's log-probs and gradients are the stock model's
    within bf16 rounding: no further from them than the stock model's own bf16 results are
    from its fp32 ones."""
    monkeypatch.setattr("ptlight.engine.lean.AUTOCAST_DEVICES", ("cuda", "cpu"))
    stock, fused = _pair(device)
    args = _args(device=device)
    want32 = scores_and_grads(stock, args, pack=2)
    results = []
    for m in (stock, fused):
        with torch.autocast(device, dtype=torch.bfloat16):
            results.append(scores_and_grads(m, args, pack=2))
    (want, _), (got, _) = results
    bf16_error = (want - want32[0]).abs().max()
    assert (got - want).abs().max() <= 2 * bf16_error
    for g, w, w32 in zip(results[1][1], results[0][1], want32[1]):
        assert (g - w).norm() <= 2 * (w - w32).norm() + 1e-6 * w32.norm()


def test_fused_projections_match_the_stock_ones_under_bf16_autocast(monkeypatch):
    """CPU autocast's native bf16 kernels stand in for CUDA's, which the lean MLP serves."""
    _under_bf16_autocast("cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_projections_match_the_stock_ones_under_cuda_bf16_autocast(monkeypatch):
    """What ``trainer.precision=bf16-mixed`` runs on a GPU: cuBLAS bf16 products."""
    _under_bf16_autocast("cuda", monkeypatch)


def test_a_training_step_dispatches_fewer_matmuls():
    """Per attention layer 2 fewer matmuls forward and 4 backward (q/k/v: one product, one for
    the input's gradient, one for the weights'); per MLP 1 forward and 2 backward (w1/w3)."""
    counts = []
    for m in _pair():
        with _Matmuls() as mm:
            scores_and_grads(m, _args(), pack=2)
        counts.append(mm.n)
    assert counts[0] - counts[1] == 1 * 6 + 3 * 3


def test_calls_without_gradients_take_the_stock_projections():
    """Scoring without gradients (a reference, generation) runs the stock layers, bitwise; a
    training forward leaves no sibling's part behind; a part stashed for another input (a
    projection called on its own) is not handed out."""
    stock, fused = _pair()
    args = _args()
    with torch.no_grad():
        want = stock(input_ids=args[0], attention_mask=args[1]).logits
        assert torch.equal(fused(input_ids=args[0], attention_mask=args[1]).logits, want)
    scores_and_grads(fused, args, pack=2)
    assert not [m for m in fused.modules() if "_ptl_fused_out" in m.__dict__]
    attn = next(m for m in fused.modules() if type(m).__name__ == "Lfm2Attention")
    attn.q_proj(torch.randn(5, 64))  # stashes k's and v's parts for this input
    assert "_ptl_fused_out" in attn.k_proj.__dict__
    with torch.no_grad():
        got = fused(input_ids=args[0], attention_mask=args[1]).logits
    assert torch.equal(got, want)
    x = torch.randn(3, 64)
    assert torch.allclose(attn.k_proj(x), x @ attn.k_proj.weight.T, atol=1e-6)


def test_lora_layers_are_not_fused(compose_cfg):
    """Peft's LoRA projections keep their own forward (their adapters train as before)."""
    from ptlight.model.backbone import build_policy as build

    cfg = compose_cfg("method=sft", "model.lora.enabled=true", *TINY)
    policy = build(cfg.model, load_tokenizer(cfg.model))
    attn = next(m for m in policy.modules() if type(m).__name__ == "Lfm2Attention")
    assert not fusable([attn.q_proj, attn.k_proj, attn.v_proj])
    assert install_fused_projections(policy) == 0


def test_a_dpo_run_with_fused_projections_trains_as_the_stock_one(compose_cfg, tmp_path,
                                                                 monkeypatch):
    import ptlight.train as train

    installed = []
    monkeypatch.setattr(train, "install_fused_projections",
                        lambda m: installed.append(install_fused_projections(m)) or installed[-1])
    stock = dpo_losses(compose_cfg, tmp_path / "stock")
    assert installed == []  # auto: off on the CPU
    fused = dpo_losses(compose_cfg, tmp_path / "fused", "model.fuse_projections=true")
    assert installed == [4] and len(fused) == len(stock) == 3
    assert fused == pytest.approx(stock, abs=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["model.fuse_projections=yes"], "model.fuse_projections='yes'.*auto"),
    (["model.fuse_projections=true", "model.compile=true"], "model.fuse_projections=true with "
     "model.compile=True"),
    (["model.fuse_projections=true", "trainer=fsdp"], "model.fuse_projections=true with "
     "trainer=fsdp"),
])
def test_model_fuse_projections_is_checked_before_any_weights_load(
        compose_cfg, tmp_path, no_weights, overrides, message):
    cfg = compose_cfg("method=dpo", *TINY, *overrides)
    with pytest.raises(ConfigError, match=message):
        train_stage(cfg, tmp_path)


def test_auto_fuses_models_up_to_the_measured_width():
    """``auto`` on CUDA: fused where the H200 measured it faster (hidden 1024: the 350M step
    waited on the host), not where it measured it slower (hidden 2048: the 1.2B step's kernels
    filled it); a model without LFM2 layers has nothing to fuse."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    stock, _ = _pair()
    assert AUTO_MAX_HIDDEN_SIZE == 1024 and auto_fuses(stock)  # the tiny LFM2, 64 wide
    with torch.device("meta"):
        for hidden, fused in ((1024, True), (2048, False)):
            arch = {**OmegaConf.to_container(tiny_model_cfg().arch), "hidden_size": hidden,
                    "intermediate_size": 4 * hidden}
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
            assert auto_fuses(model) is fused
        llama = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=100))
    assert not auto_fuses(llama)
