"""bf16 autocast through fp32 GEMMs (ptlight/engine/cpu_bf16.py): the same numbers as native bf16
autocast within bf16 rounding, no bf16 GEMM left at the dispatcher, and the ``cpu_bf16`` key.

Tolerances. A rerouted op and the native one round the same bf16 operands and round their
fp32 accumulations to bf16, so they differ by the summation order (and, in attention, by the
native kernel's bf16 softmax probabilities): one or two bf16 ulps, ``rtol=2**-7`` plus
``atol`` of one ulp at the output's largest magnitude (a sum that cancels keeps the
summands' rounding). Through a whole model the two runs round different values at every layer,
so there is no fixed ulp bound; the yardstick is fp32: upcast must be about as close to fp32
as native bf16 is (error at most 1.5x native's plus 2e-3, about one bf16 rounding ``2**-9``),
which a wrong cast, a missing rounding point or a broken gradient would break by far.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import TINY, tiny_model_cfg
from ptlight.engine import cpu_bf16
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.engine.cpu_bf16 import UpcastBf16, UpcastBf16Precision, precision_plugins, resolve_mode
from ptlight.data.module import pad_rows
from ptlight.errors import ConfigError
from ptlight.engine.logps import completion_logps
from ptlight.train import train_stage

# the aten kernels the rerouted ops end in (forward and backward)
GEMMS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "convolution", "convolution_backward",
         "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention_for_cpu_backward"}


class GemmWatch(TorchDispatchMode):
    """What the GEMM-class aten kernels really ran (below autocast): ``bf16`` counts calls with a
    bf16 operand (torch's bf16 kernels), ``unrounded`` fp32 calls with an operand that bf16
    cannot represent (an operand autocast would have rounded). The flash-attention backward is
    not checked for rounding: it also takes the forward's fp32 output and logsumexp."""

    def __init__(self) -> None:
        super().__init__()
        self.bf16: collections.Counter[str] = collections.Counter()
        self.unrounded: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in GEMMS:
            floating = [t for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if any(t.dtype == torch.bfloat16 for t in floating):
                self.bf16[name] += 1
            elif not name.endswith("backward") or name.startswith("convolution"):
                if any(not torch.equal(t, t.bfloat16().float()) for t in floating):
                    self.unrounded[name] += 1
        return func(*args, **kwargs)


def _t(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _cases():
    a, b, w, bias = _t(8, 16, seed=0), _t(16, 12, seed=1), _t(12, 16, seed=2), _t(12, seed=3)
    A, B = _t(3, 8, 16, seed=4), _t(3, 16, 12, seed=5)
    q, k, v = (_t(3, 2, 6, 8, seed=s) for s in (6, 7, 8))
    x, cw, cb = _t(2, 4, 10, seed=9), _t(4, 1, 3, seed=10), _t(4, seed=11)
    return {
        "linear": (lambda: F.linear(a, w, bias), [a, w, bias]),
        "matmul": (lambda: torch.matmul(A, b), [A, b]),
        "@": (lambda: a @ b, [a, b]),
        "rmatmul": (lambda: b.__rmatmul__(a), [a, b]),
        "Tensor.matmul": (lambda: a.matmul(b), [a, b]),
        "mm": (lambda: torch.mm(a, b), [a, b]),
        "bmm": (lambda: torch.bmm(A, B), [A, B]),
        "addmm": (lambda: torch.addmm(bias, a, b), [bias, a, b]),
        "baddbmm": (lambda: torch.baddbmm(bias, A, B, alpha=0.5), [bias, A, B]),
        "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v]),
        "conv1d": (lambda: F.conv1d(x, cw, cb, padding=2, groups=4), [x, cw, cb]),
    }


def _run_op(name: str, upcast: bool):
    fn, inputs = _cases()[name]
    mode = UpcastBf16() if upcast else contextlib.nullcontext()
    gemms = GemmWatch()
    with gemms:
        with torch.autocast("cpu", torch.bfloat16), mode:
            out = fn()
        out.float().pow(2).sum().backward()
    return out, [t.grad for t in inputs], gemms, getattr(mode, "rerouted", None)


def _close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7,
                               atol=2**-7 * want.float().abs().max().item())


@pytest.mark.parametrize("name", list(_cases()))
def test_each_rerouted_op_equals_native_autocast_and_runs_no_bf16_gemm(name):
    native, native_grads, native_gemms, _ = _run_op(name, upcast=False)
    up, up_grads, up_gemms, rerouted = _run_op(name, upcast=True)
    assert native_gemms.bf16, "the watch sees native autocast's bf16 kernels"
    assert rerouted == 1 and not up_gemms.bf16, up_gemms.bf16  # forward and backward: fp32
    assert not up_gemms.unrounded, up_gemms.unrounded  # on operands rounded like autocast's
    assert up.dtype == native.dtype == torch.bfloat16
    _close_in_bf16(up, native)
    for g_up, g_native in zip(up_grads, native_grads):
        assert g_up.dtype == g_native.dtype == torch.float32
        _close_in_bf16(g_up, g_native)


def test_what_autocast_would_not_run_in_bf16_is_left_alone():
    a, w = torch.randn(4, 8), torch.randn(3, 8)
    mode = UpcastBf16()
    with mode:
        assert F.linear(a, w).dtype == torch.float32  # autocast off
        with torch.autocast("cpu", torch.bfloat16):
            assert F.linear(a.double(), w.double()).dtype == torch.float64
            ints = torch.ones(2, 2, dtype=torch.long)
            assert torch.equal(ints @ ints, torch.full((2, 2), 2))
            assert F.linear(a.to("meta"), w.to("meta")).dtype == torch.float32  # not the CPU
            out = torch.empty(4, 3)
            torch.matmul(a, w.T, out=out)  # out= keeps its dtype: native
            assert torch.relu(a).dtype == torch.float32  # not a GEMM
    assert mode.rerouted == 0


def _checkpointed_grads(how: str):
    """Gradients of a two-linear block under the upcast plugin's forward context, plain or
    checkpointed; the GEMMs the whole forward + backward ran."""
    from torch.utils.checkpoint import checkpoint

    x, w = _t(6, 8, seed=0), _t(8, 8, seed=1)
    block = lambda a: F.linear(F.gelu(F.linear(a, w)), w)  # noqa: E731
    kwargs = {"plain": None, "reentrant": {"use_reentrant": True},
              "non-reentrant": {"use_reentrant": False},
              "context_fn": {"use_reentrant": False, "context_fn": cpu_bf16.checkpoint_contexts}
              }[how]
    gemms = GemmWatch()
    with gemms:
        with UpcastBf16Precision().forward_context():
            y = block(x) if kwargs is None else checkpoint(block, x, **kwargs)
        y.float().pow(2).sum().backward()
    return x.grad, w.grad, gemms


def test_checkpointed_recomputation_with_checkpoint_contexts_is_rerouted_too():
    """torch's checkpoint recomputes in the backward, where the mode is not active: with
    ``context_fn=checkpoint_contexts`` it is, and the gradients are the plain ones exactly."""
    *plain, _ = _checkpointed_grads("plain")
    *recomputed, gemms = _checkpointed_grads("context_fn")
    assert not gemms.bf16 and not gemms.unrounded, (gemms.bf16, gemms.unrounded)
    for got, want in zip(recomputed, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cpu_bf16.checkpoint_contexts()[1].__class__ is contextlib.nullcontext  # no mode on


def test_checkpointed_recomputation_without_it_is_native_or_refused():
    """What the module docstring says happens without ``checkpoint_contexts``."""
    from torch.utils.checkpoint import CheckpointError

    *plain, _ = _checkpointed_grads("plain")
    *recomputed, gemms = _checkpointed_grads("reentrant")
    assert gemms.bf16["mm"] > 0  # the recomputation ran torch's bf16 kernels
    for got, want in zip(recomputed, plain):
        _close_in_bf16(got, want)
    with pytest.raises(CheckpointError, match="different metadata"):
        _checkpointed_grads("non-reentrant")


# ---- a tiny LFM2 end to end: completion log-probs and gradients ---------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    return build_policy(cfg, load_tokenizer(cfg))


def _pairwise_batch():
    """2 blocks (chosen, rejected) over 4 prompts, random ids (the collate's layout)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(n) for n in (5, 9, 1, 7)]
    lens = [[4, 1, 6, 3], [7, 3, 2, 5]]
    return pad_rows([(p, ids(lens[j][i])) for j in range(2) for i, p in enumerate(prompts)], 0)


def _logps_and_grads(model, batch, how: str, pack):
    model.zero_grad()
    mode = UpcastBf16() if how == "upcast" else contextlib.nullcontext()
    gemms = GemmWatch()
    with gemms:
        with torch.autocast("cpu", torch.bfloat16, enabled=how != "fp32"), mode:
            sums = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["loss_mask"], pack=pack).sequence_sum()
        (sums * torch.arange(1.0, 9.0)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return sums.detach(), grads, gemms


@pytest.mark.parametrize("pack", [None, 2])
def test_completion_logps_upcast_is_as_close_to_fp32_as_native_bf16(model, pack):
    batch = _pairwise_batch()
    f32, f32_grads, _ = _logps_and_grads(model, batch, "fp32", pack)
    nat, nat_grads, nat_gemms = _logps_and_grads(model, batch, "native", pack)
    up, up_grads, up_gemms = _logps_and_grads(model, batch, "upcast", pack)
    assert nat_gemms.bf16["mm"] > 0 and not up_gemms.bf16, up_gemms.bf16
    assert not up_gemms.unrounded, up_gemms.unrounded

    nat_err, up_err = (nat - f32).abs().max().item(), (up - f32).abs().max().item()
    assert 0 < nat_err < 0.05  # bf16 moved the sums (of 7-45 nats), but not by much
    assert up_err <= 1.5 * nat_err + 2e-3, (up_err, nat_err)
    assert (up - nat).abs().max().item() <= 2.5 * nat_err + 2e-3

    def rel(g, name):
        return ((g[name] - f32_grads[name]).norm() / f32_grads[name].norm()).item()

    for name in f32_grads:
        nat_rel, up_rel = rel(nat_grads, name), rel(up_grads, name)
        assert up_rel <= 1.5 * nat_rel + 2e-3 and up_rel < 0.05, (name, up_rel, nat_rel)


# ---- the cpu_bf16 key ----------------------------------------------------------------------


def _trainer(**kw):
    return OmegaConf.create({"_target_": "lightning.Trainer", "accelerator": "cpu",
                             "precision": "bf16-mixed", **kw})


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_bad_cpu_bf16_value_is_a_config_error(precision):
    with pytest.raises(ConfigError, match=r"cpu_bf16='fast'.*auto, upcast, native"):
        precision_plugins(_trainer(precision=precision), "fast")


def test_a_bad_value_fails_before_the_model_is_built(compose_cfg, tmp_path, monkeypatch):
    import ptlight.train

    def never(*_a, **_k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(ptlight.train, "build_policy", never)
    cfg = compose_cfg("method=sft", "cpu_bf16=bf16", *TINY)
    with pytest.raises(ConfigError, match="cpu_bf16"):
        train_stage(cfg, tmp_path)


def test_auto_follows_the_cpu_and_the_config_default_is_auto(compose_cfg, monkeypatch):
    assert compose_cfg().cpu_bf16 == "auto"
    for native, want in ((True, "native"), (False, "upcast")):
        monkeypatch.setattr(cpu_bf16, "has_native_bf16_matmul", lambda n=native: n)
        assert resolve_mode("auto") == want
    assert resolve_mode("upcast") == "upcast" and resolve_mode("native") == "native"


def test_native_bf16_detection(monkeypatch):
    monkeypatch.setattr(cpu_bf16.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert cpu_bf16.has_native_bf16_matmul() == (avx512_bf16 or amx)
    monkeypatch.setattr(cpu_bf16.platform, "machine", lambda: "aarch64")  # /proc/cpuinfo
    for flags, want in (({"fp", "asimd", "bf16"}, True), ({"fp", "asimd"}, False),
                        (None, True)):  # unreadable: keep torch's kernels
        monkeypatch.setattr(cpu_bf16, "_cpuinfo_flags", lambda f=flags: f)
        assert cpu_bf16.has_native_bf16_matmul() == want


def test_only_bf16_mixed_on_the_cpu_gets_the_upcast_plugin():
    rest, plugins = precision_plugins(_trainer(), "upcast")
    assert [type(p) for p in plugins] == [UpcastBf16Precision] and "precision" not in rest
    assert plugins[0].precision == "bf16-mixed" and rest.accelerator == "cpu"
    for cfg, mode in ((_trainer(precision="32-true"), "upcast"), (_trainer(), "native"),
                      (_trainer(accelerator="gpu"), "upcast")):
        assert precision_plugins(cfg, mode) == (cfg, [])


def _run_dpo(compose_cfg, run_dir, mode: str):
    """A tiny DPO run in bf16-mixed with the reference precomputed (its forward goes through
    the precision plugin too); returns the train losses and the bf16 GEMMs that ran."""
    cfg = compose_cfg("method=dpo", "trainer.precision=bf16-mixed", f"cpu_bf16={mode}",
                      "method.reference=precompute", "method.reference_cache=null",
                      "eval.before=false", "eval.val_samples=0", *TINY)
    gemms = GemmWatch()
    with gemms:
        report = train_stage(cfg, run_dir)
    assert report["global_step"] == 3
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")], gemms.bf16


def test_a_bf16_mixed_run_uses_the_upcast_path(compose_cfg, tmp_path):
    up, up_gemms = _run_dpo(compose_cfg, tmp_path / "upcast", "upcast")
    native, native_gemms = _run_dpo(compose_cfg, tmp_path / "native", "native")
    assert native_gemms["mm"] > 0  # native bf16-mixed runs bf16 kernels ...
    assert not up_gemms, up_gemms  # ... upcast none: training, validation, reference precompute
    assert len(up) == 3 and all(math.isfinite(v) for v in up)
    assert up[0] == pytest.approx(math.log(2), abs=2e-2)  # policy == reference at step 0
    assert up == pytest.approx(native, abs=2e-2)
