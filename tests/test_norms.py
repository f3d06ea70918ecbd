"""``model.fused_norm``: RMSNorm layers as ``F.rms_norm`` compute what the stock layers do
(bitwise in fp32 on the CPU, within bf16 rounding otherwise), through the padded and packed
scoring paths, a frozen copy and a training run; calls the fused kernel would not serve keep
the stock forward; on CUDA the fused kernels are the ones that run."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (TINY, assert_same_scores_and_grads, dpo_losses, pair_batch,
                     scores_and_grads, tiny_model_cfg)
from ptlight.engine.norms import RMSNORM_CLASSES, install_fused_norms
from ptlight.errors import ConfigError
from ptlight.model.backbone import build_policy, frozen_copy, load_tokenizer
from ptlight.train import train_stage


def _models(dtype: str = "float32"):
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        cfg = tiny_model_cfg(fused_norm=fused)
        cfg.dtype = dtype
        models.append(build_policy(cfg, load_tokenizer(cfg)))
    return models


def _batch(length: int, seed: int) -> tuple[torch.Tensor, ...]:
    b = pair_batch(length, seed)
    return b["input_ids"], b["attention_mask"], b["loss_mask"]


class _Ops(TorchDispatchMode):
    """Names of the aten ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_every_rmsnorm_of_the_model_is_routed_once_and_copies_keep_it():
    stock, fused = _models()
    norms = [m for m in fused.modules() if type(m).__name__ == "Lfm2RMSNorm"]
    # 3 layers x (operator_norm, ffn_norm) + the attention layer's q/k norms + the final norm
    assert len(norms) == 9 and all("forward" in vars(m) for m in norms)
    assert not any("forward" in vars(m) for m in stock.modules())
    assert install_fused_norms(fused) == 9  # idempotent: counted, not wrapped again
    assert list(fused.state_dict()) == list(stock.state_dict())  # exports unchanged
    ref = frozen_copy(fused)
    for m in ref.modules():
        if type(m).__name__ == "Lfm2RMSNorm":
            assert m.forward.__self__ is m  # bound to the copy, not to the policy's layer


@pytest.mark.parametrize("pack", [None, 2])
def test_fused_norms_give_the_stock_logps_and_gradients_in_fp32(pack):
    """On the CPU ``F.rms_norm`` decomposes into the stock layer's ops: log-probs and
    gradients are bitwise the same."""
    stock, fused = _models()
    for seed, length in enumerate((24, 37)):
        args = _batch(length, seed)
        got, want = (scores_and_grads(m, args, pack=pack) for m in (fused, stock))
        assert_same_scores_and_grads(got, want, 0, 0)


def test_fused_norms_match_the_stock_model_in_bf16_weights(monkeypatch):
    """``model.dtype=bfloat16``: input and weight share a dtype, so ``F.rms_norm`` runs (in
    fp32 inside, one rounding where the stock layer has two)."""
    stock, fused = _models("bfloat16")
    for model in (stock, fused):  # norm weights away from 1, the same in both
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if type(m).__name__ == "Lfm2RMSNorm":
                m.weight.data = (1 + 0.5 * torch.randn(m.weight.shape, generator=g)).bfloat16()
    calls = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm",
                        lambda *a, **k: calls.append(a[0].dtype) or rms_norm(*a, **k))
    args = _batch(30, 0)
    with torch.no_grad():
        got = torch.stack([m(input_ids=args[0], attention_mask=args[1]).logits.float()
                           for m in (fused, stock)])
    assert calls == [torch.bfloat16] * 9  # every norm of the fused model, none of the stock
    torch.testing.assert_close(got[0], got[1], atol=0.1, rtol=0.05)


def test_mixed_dtypes_without_cuda_autocast_keep_the_stock_forward():
    """QLoRA keeps fp32 norms on bf16 activations, and CPU autocast does not run rms_norm in
    fp32: ``F.rms_norm`` would fall back and return the input's dtype, the stock layer
    returns the promoted one. Such calls take the stock forward, bitwise."""
    _, fused = _models()
    norm = next(m for m in fused.modules() if type(m).__name__ == "Lfm2RMSNorm")
    stock = copy.deepcopy(norm)
    del stock.forward, stock._ptl_fused_norm
    x = torch.randn(4, 64).to(torch.bfloat16)
    with _Ops() as ops:
        out = norm(x)
    assert out.dtype == torch.float32 and "aten.rsqrt" in ops.names
    torch.testing.assert_close(out, stock(x), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(norm(x), stock(x), atol=0, rtol=0)


def test_a_dpo_run_with_fused_norms_trains_as_the_stock_one(compose_cfg, tmp_path,
                                                           monkeypatch):
    import ptlight.model.backbone as backbone

    installed = []
    monkeypatch.setattr(backbone, "install_fused_norms",
                        lambda m: installed.append(install_fused_norms(m)) or installed[-1])
    stock = dpo_losses(compose_cfg, tmp_path / "stock")
    assert installed == []
    fused = dpo_losses(compose_cfg, tmp_path / "fused", "model.fused_norm=true")
    assert installed == [9] and len(fused) == len(stock) == 3
    assert fused == stock  # fp32 on the CPU: bitwise


@pytest.mark.parametrize("name", sorted(RMSNORM_CLASSES))
def test_every_listed_rmsnorm_class_is_the_function_f_rms_norm_computes(name):
    """The allow-list holds: with a weight away from 1, each class's stock forward equals the
    routed one bitwise in fp32 (a transformers release that changed one would fail here)."""
    import importlib

    module = importlib.import_module(
        f"transformers.models.{name[:-len('RMSNorm')].lower()}.modeling_"
        f"{name[:-len('RMSNorm')].lower()}")
    norm = getattr(module, name)(32, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    x = torch.randn(4, 7, 32) * 3
    want = norm(x)
    assert install_fused_norms(torch.nn.Sequential(norm)) == 1
    torch.testing.assert_close(norm(x), want, atol=0, rtol=0)


def test_a_model_without_a_known_rmsnorm_is_left_as_it_is():
    class GemmaStyleRMSNorm(torch.nn.Module):  # 1 + weight: not the function F.rms_norm is
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), GemmaStyleRMSNorm())
    assert install_fused_norms(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())


def test_model_fused_norm_takes_a_boolean_or_auto(compose_cfg, tmp_path, no_weights):
    cfg = compose_cfg("method=dpo", "model.fused_norm=yes", *TINY)
    with pytest.raises(ConfigError, match="model.fused_norm='yes'.*auto"):
        train_stage(cfg, tmp_path / "run")


def test_auto_outside_training_follows_cuda_visibility(monkeypatch):
    """``ptlight.eval`` and ``ptlight.label`` build models with ``model.fused_norm=auto`` as
    composed: fused where CUDA is visible, as a training run there settles it."""
    for visible in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
        cfg = tiny_model_cfg(fused_norm="auto")
        model = build_policy(cfg, load_tokenizer(cfg))
        assert any("forward" in vars(m) for m in model.modules()) is visible


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pack", [None, 2])
def test_fused_norms_run_cuda_fused_kernels_and_match_under_bf16_autocast(pack):
    """What ``trainer.precision=bf16-mixed`` runs on a GPU: every norm runs in fp32, bf16
    inputs (LFM2's q/k norms) included, so torch's fused kernels run forward and backward
    and no norm decomposes; the result differs from the stock layer by its bf16 rounding
    only."""
    stock, fused = (m.cuda() for m in _models())
    args = tuple(t.cuda() for t in _batch(40, 0))
    with torch.autocast("cuda", dtype=torch.bfloat16), _Ops() as ops:
        got = scores_and_grads(fused, args, pack=pack)
    assert {"aten._fused_rms_norm", "aten._fused_rms_norm_backward"} <= ops.names
    assert "aten.rsqrt" not in ops.names  # no norm took the decomposed path
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = scores_and_grads(stock, args, pack=pack)
    assert_same_scores_and_grads(got, want, 5e-2, 5e-2)


def test_count_ops_script_counts_the_step_and_the_norms_share():
    """``scripts/count_ops.py`` (the op counts in docs/performance.md) runs and says what a
    norm costs (the tiny layout here: 9 norms), and fewer ops with one op each way."""
    import re
    import subprocess
    import sys

    from helpers import REPO

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "count_ops.py"), "--top", "3",
                          "--fixture", "tiny"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    total = int(re.search(r"ops that compute: (\d+)", text).group(1))
    fused = int(re.search(r"\): \d+ ops, (\d+) that compute", text).group(1))
    assert "RMSNorm layers: 9;" in text and 0 < fused < total
    assert len(re.findall(r"^ +\d+  aten\.", text, re.M)) == 3
