"""``model.compile``: compiled norms and MLPs (and whole layers in packed scoring) give the
eager log-probs and gradients, a new sequence length does not recompile, a frozen copy runs
its own compiled code, and a training run matches an eager one."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_leaves

from helpers import (TINY, assert_same_scores_and_grads, dpo_losses, pair_batch,
                     scores_and_grads, tiny_model_cfg)
from ptlight.engine.compile import decoder_layers, is_compiled
from ptlight.engine.logps import completion_logps
from ptlight.errors import ConfigError
from ptlight.model.backbone import build_policy, frozen_copy, load_tokenizer
from ptlight.train import train_stage


def _models():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    eager = build_policy(cfg, load_tokenizer(cfg))
    torch.manual_seed(0)
    cfg = tiny_model_cfg(compile=True)
    return eager, build_policy(cfg, load_tokenizer(cfg))


def _graph_models(device: str = "cpu"):
    """``(eager, compiled with model.compile_mode=reduce-overhead)`` on ``device``, same
    weights."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    eager = build_policy(cfg, load_tokenizer(cfg))
    torch.manual_seed(0)
    cfg = tiny_model_cfg(compile=True, compile_mode="reduce-overhead")
    return eager.to(device), build_policy(cfg, load_tokenizer(cfg)).to(device)


def test_the_norms_and_mlps_of_every_layer_are_compiled_in_place():
    eager, compiled = _models()
    layers = decoder_layers(compiled)
    assert len(layers) == 3 and is_compiled(compiled) and not is_compiled(eager)
    for layer in layers:
        done = {name for name, m in layer.named_children()
                if getattr(m, "_compiled_call_impl", None) is not None}
        assert done == {"operator_norm", "ffn_norm", "feed_forward"}
    assert list(compiled.state_dict()) == list(eager.state_dict())  # exports unchanged


@pytest.mark.parametrize("pack", [None, 2])
def test_compiled_blocks_give_the_eager_logps_and_gradients_without_recompiling(pack):
    eager, compiled = _models()
    graphs = []
    for i, length in enumerate((24, 31, 40, 47)):
        batch = pair_batch(length, i)
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert_same_scores_and_grads(scores_and_grads(compiled, args, pack=pack),
                                     scores_and_grads(eager, args, pack=pack), 1e-5, 1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    # dynamic shapes: the lengths after the first two reuse the compiled graphs
    assert graphs[3] == graphs[1]


@pytest.mark.parametrize("pack", [None, 2])  # compiled blocks; compiled whole layers
def test_a_frozen_copy_of_a_compiled_model_runs_its_own_blocks(pack):
    """A compiled function is bound to its module; the reference copy must not run the
    policy's (it would follow the policy's updates)."""
    _, policy = _models()
    batch = pair_batch(20, 0)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        completion_logps(policy, *args, pack=pack)  # compiled before the copy is taken
        reference = frozen_copy(policy)
        before = completion_logps(reference, *args, pack=pack).logps
        for layer in decoder_layers(policy):
            layer.feed_forward.w2.weight.mul_(3.0)
        moved = completion_logps(policy, *args, pack=pack).logps
        after = completion_logps(reference, *args, pack=pack).logps
    assert not torch.allclose(moved, before)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.slow
def test_dpo_training_with_compiled_blocks_matches_eager(compose_cfg, tmp_path):
    runs = {flag: dpo_losses(compose_cfg, tmp_path / flag, f"model.compile={flag}")
            for flag in ("false", "true", "packed")}
    assert len(runs["true"]) == len(runs["packed"]) == 3
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-4)
    assert runs["packed"] == pytest.approx(runs["false"], abs=1e-4)


def test_compile_packed_compiles_packed_scoring_only_and_matches_eager():
    """``model.compile=packed``: the packed step runs compiled whole layers (equal to eager);
    padded scoring and generation run eager and compile nothing."""
    eager, _ = _models()
    torch.manual_seed(0)
    cfg = tiny_model_cfg(compile="packed")
    packed_only = build_policy(cfg, load_tokenizer(cfg))
    assert is_compiled(packed_only)
    assert not any(getattr(m, "_compiled_call_impl", None) is not None
                   for m in packed_only.modules())  # no block compiled in place
    batch = pair_batch(30, 0)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch._dynamo.reset()
    counters.clear()
    assert_same_scores_and_grads(scores_and_grads(packed_only, args, pack=None),
                                 scores_and_grads(eager, args, pack=None), 1e-6, 1e-5)
    with torch.no_grad():
        packed_only.eval()
        packed_only.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
        packed_only.train()
    assert counters["stats"]["unique_graphs"] == 0  # padded scoring and generation: eager
    assert_same_scores_and_grads(scores_and_grads(packed_only, args, pack=2),
                                 scores_and_grads(eager, args, pack=2), 1e-5, 1e-4)
    assert counters["stats"]["unique_graphs"] > 0  # packed scoring: compiled


@pytest.mark.parametrize("overrides,why", [
    (["method=sft"], "this method has no packed scoring"),
    (["method=dpo", "method.pack=false"], "method.pack is false"),
    (["method=grpo"], r"the RL methods' packed scoring \(method.rollout.pack, method.ppo.pack\) "
                      "is not one of the calls it covers"),
])
def test_compile_packed_on_a_run_that_never_packs_is_refused(compose_cfg, tmp_path, no_weights,
                                                             overrides, why):
    cfg = compose_cfg(*overrides, "model.compile=packed", *TINY)
    with pytest.raises(ConfigError, match=f"model.compile=packed compiles the preference "
                                          f"methods' packed scoring, and this run does not "
                                          f"pack: {why}"):
        train_stage(cfg, tmp_path / "run")


def test_compile_packed_with_gradient_checkpointing_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("method=dpo", "model.compile=packed",
                      "model.gradient_checkpointing=true", *TINY)
    with pytest.raises(ConfigError, match="model.compile=packed compiles whole layers"):
        train_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_model_compile_takes_a_boolean(compose_cfg, tmp_path):
    cfg = compose_cfg("method=dpo", "model.compile=yes", *TINY)
    with pytest.raises(ConfigError, match="model.compile='yes'"):
        train_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_compile_mode_reaches_every_compiled_block_and_layer(monkeypatch):
    """``model.compile_mode`` is the ``mode`` of each ``torch.compile`` call: the blocks at
    build time, the whole layers at the first packed call (compilation itself is stubbed
    out here: the modes are what is checked)."""
    modes = []

    def record(fn, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    cfg = tiny_model_cfg(compile=True, compile_mode="reduce-overhead")
    policy = build_policy(cfg, load_tokenizer(cfg))
    assert modes == ["reduce-overhead"] * 9  # 3 layers × (two norms, the MLP)
    batch = pair_batch(20, 0)
    completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                     pack=2)
    assert modes == ["reduce-overhead"] * 12  # + each whole layer, for packed scoring
    modes.clear()
    cfg = tiny_model_cfg(compile=True)
    build_policy(cfg, load_tokenizer(cfg))
    assert modes == [None] * 9  # default: torch.compile's own default


class _GraphGenerations:
    """torch.compile stubbed with cudagraph trees' rule for calls without gradients: each such
    call starts a new generation, whose replay may overwrite the last one's outputs, so a
    tensor the last call returned must not come back as an input (torch raises "accessing
    tensor output of CUDAGraphs that has been overwritten by a subsequent run")."""

    def __init__(self):
        self.last: list[torch.Tensor] = []
        self.calls = 0

    def compile(self, fn, *args, mode=None, **kwargs):
        assert mode == "reduce-overhead"

        def replay(*a, **k):
            if not torch.is_grad_enabled():
                inputs = [t for t in tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
                if any(t is o for t in inputs for o in self.last):
                    raise RuntimeError("accessing tensor output of CUDAGraphs that has been "
                                       "overwritten by a subsequent run")
            out = fn(*a, **k)
            if not torch.is_grad_enabled():
                self.calls += 1
                self.last = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

        return replay


@pytest.mark.parametrize("pack", [None, 2])  # compiled blocks; compiled whole layers
def test_a_call_without_gradients_under_cuda_graphs_keeps_no_graph_output(monkeypatch, pack):
    """``model.compile_mode=reduce-overhead``: scoring without gradients (a precomputed or
    live reference, evaluation) chains compiled calls, none held by a pending backward; each
    call's outputs leave the graph's memory before the next call (the real graphs:
    ``test_scoring_without_gradients_under_cuda_graphs_matches_eager_on_cuda``)."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    eager = build_policy(cfg, load_tokenizer(cfg))
    graphs = _GraphGenerations()
    monkeypatch.setattr(torch, "compile", graphs.compile)
    torch.manual_seed(0)
    cfg = tiny_model_cfg(compile=True, compile_mode="reduce-overhead")
    policy = build_policy(cfg, load_tokenizer(cfg))
    batch = pair_batch(24, 0)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        got = completion_logps(policy, *args, pack=pack).logps
        want = completion_logps(eager, *args, pack=pack).logps
    # every block; every whole layer, and (stubbed, not inlined) the blocks inside it
    assert graphs.calls == (9 if pack is None else 12)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # with gradients the outputs stay the graph's own: the backward holds the generation
    assert_same_scores_and_grads(scores_and_grads(policy, args, pack=pack),
                                 scores_and_grads(eager, args, pack=pack), 0, 0)


@pytest.mark.parametrize("pack", [None, 2])
def test_graph_mode_compiles_through_its_no_grad_clones_and_matches_eager(pack):
    """The same compiled layers with ``compile_mode=reduce-overhead``, compiled for real (the
    CPU records no graphs, but dynamo traces the whole layer through each block's no-grad
    clone wrapper): scores with and without gradients, and gradients, equal eager."""
    eager, graphs = _graph_models()
    for i, length in enumerate((24, 40)):
        batch = pair_batch(length, i)
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        with torch.no_grad():
            torch.testing.assert_close(completion_logps(graphs, *args, pack=pack).logps,
                                       completion_logps(eager, *args, pack=pack).logps,
                                       atol=1e-5, rtol=1e-4)
        assert_same_scores_and_grads(scores_and_grads(graphs, args, pack=pack),
                                     scores_and_grads(eager, args, pack=pack), 1e-5, 1e-4)


@pytest.mark.parametrize("overrides,match", [
    (("model.compile=true", "model.compile_mode=fast"), "model.compile_mode='fast'"),
    (("model.compile_mode=reduce-overhead",), "model.compile=true"),
    (("model.compile=true", "model.compile_mode=reduce-overhead",
      "trainer.accumulate_grad_batches=2"), "not verified with gradient accumulation"),
])
def test_a_compile_mode_that_cannot_apply_is_refused_before_weights_load(
        compose_cfg, tmp_path, no_weights, overrides, match):
    cfg = compose_cfg("method=dpo", *TINY, *overrides)
    with pytest.raises(ConfigError, match=match):
        train_stage(cfg, tmp_path / "run")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_layers_under_cuda_graphs_match_eager_on_cuda():
    """``model.compile_mode=reduce-overhead``: packed scoring through CUDA graphs of the
    compiled layers gives the eager log-probs and gradients, for a new shape (recorded), the
    next, and the first one again (replayed)."""
    eager, graphs = _graph_models("cuda")
    for i, length in enumerate((24, 40, 24, 24)):
        batch = {k: v.cuda() for k, v in pair_batch(length, i).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert_same_scores_and_grads(scores_and_grads(graphs, args, pack=2),
                                     scores_and_grads(eager, args, pack=2), 1e-4, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pack", [None, 2])
def test_compiled_blocks_match_eager_on_cuda(pack):
    """The same parity with CUDA's kernels (inductor's Triton code, SDPA's CUDA backends)."""
    eager, compiled = (m.cuda() for m in _models())
    for i, length in enumerate((24, 40)):
        batch = {k: v.cuda() for k, v in pair_batch(length, i).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert_same_scores_and_grads(scores_and_grads(compiled, args, pack=pack),
                                     scores_and_grads(eager, args, pack=pack), 1e-4, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pack", [None, 2])
def test_scoring_without_gradients_under_cuda_graphs_matches_eager_on_cuda(pack):
    """What a precomputed reference, a live one and evaluation run under
    ``model.compile_mode=reduce-overhead``: no-grad scoring through the graphs of the
    compiled blocks and layers, for a new shape, the next and the first again, equals eager."""
    eager, graphs = _graph_models("cuda")
    for i, length in enumerate((24, 40, 24, 24)):
        batch = {k: v.cuda() for k, v in pair_batch(length, i).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        with torch.no_grad():
            got = completion_logps(graphs, *args, pack=pack).logps.clone()
            want = completion_logps(eager, *args, pack=pack).logps
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reference,attention", [("precompute", "sdpa"), ("copy", "sdpa"),
                                                 ("precompute", "flex")])
def test_dpo_trains_under_cuda_graphs_on_cuda(compose_cfg, tmp_path, reference, attention):
    """``model.compile=true model.compile_mode=reduce-overhead`` trains DPO on CUDA in
    bf16-mixed with the reference precomputed (packed rows: the GPU defaults; with SDPA's
    dense tree mask or FlexAttention's block mask) or live (padded), and matches the eager
    run's losses within bf16 rounding."""
    flex = ["model.packed_attention=flex"] if attention == "flex" else []
    runs = {mode: dpo_losses(compose_cfg, tmp_path / mode, "trainer.accelerator=gpu",
                             "trainer.precision=bf16-mixed", f"method.reference={reference}",
                             *(["model.compile=true", f"model.compile_mode={mode}", *flex]
                               if mode != "eager" else []))
            for mode in ("eager", "reduce-overhead")}
    assert len(runs["reduce-overhead"]) == 3
    assert runs["reduce-overhead"] == pytest.approx(runs["eager"], abs=2e-2)
