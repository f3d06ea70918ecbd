"""The DPO fast path equals the plain path: log-prob parity, packed vs unpacked, prefix-shared
vs separate rows, and a training run with and without packing (ISSUE 5)."""

import copy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import (TINY, assert_same_scores_and_grads, dpo_losses, scores_and_grads,
                     tiny_model_cfg)
from helpers import prompt_block_batch as _batch
from ptlight.engine import packing
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.data.module import pad_rows
from ptlight.engine.logps import completion_index, completion_logits, completion_logps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    return build_policy(cfg, load_tokenizer(cfg))


def _reference_sums(model, batch):
    """The plain textbook computation: full logits, log_softmax, gather, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (tok * batch["loss_mask"][:, 1:]).sum(-1)


PAIRS = dict(prompt_lens=[5, 9, 1, 7], completion_lens=[[4, 1, 6, 3], [7, 3, 2, 5]])


@pytest.mark.parametrize("pack", [None, 2])
def test_sequence_logps_equal_plain_log_softmax_gather(model, pack):
    batch = _batch(**PAIRS)
    with torch.no_grad():
        want = _reference_sums(model, batch)
        got = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                               batch["loss_mask"], pack=pack).sequence_sum()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [2048, 20, 1])  # one row, several rows, a row per group
def test_packed_prefix_shared_equals_separate_rows_with_gradients(model, attn, max_tokens):
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    old = model.config._attn_implementation
    model.config._attn_implementation = attn
    try:
        grads = []
        outs = []
        for pack in (None, 2):
            model.zero_grad()
            out = completion_logps(model, *args, pack=pack, pack_max_tokens=max_tokens)
            (out.sequence_sum() * torch.arange(1.0, 9.0)).sum().backward()
            outs.append(out)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        model.config._attn_implementation = old
        model.zero_grad()
    plain, packed = outs
    torch.testing.assert_close(packed.logps, plain.logps, atol=1e-5, rtol=0)
    assert torch.equal(packed.rows, plain.rows) and torch.equal(packed.mask, plain.mask)
    torch.testing.assert_close(packed.entropy, plain.entropy, atol=1e-4, rtol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def _stock_convs(model):
    """Packing as if the tree convolution were missing: LFM2's own convolution, which reads
    the previous slots of the row, whatever the packed forward passes its conv layers."""
    def stock(self, hidden_states, *args, attention_mask=None, **kwargs):
        return type(self).forward(self, hidden_states)

    for m in model.modules():
        if type(m).__name__ == "Lfm2ShortConv":
            m.forward = types.MethodType(stock, m)


def test_conv_state_would_leak_across_branches_without_the_tree_conv(monkeypatch):
    """The test above is not vacuous: packing with LFM2's stock convolution (which reads the
    previous slots of the row) lets the rejected branch see the end of the chosen one."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    fresh = build_policy(cfg, load_tokenizer(cfg))
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    monkeypatch.setattr(packing, "install_tree_convs", _stock_convs)
    with torch.no_grad():
        plain = completion_logps(fresh, *args).sequence_sum()
        leaky = completion_logps(fresh, *args, pack=2).sequence_sum()
    assert (leaky - plain).abs().max() > 1e-4  # 10x the tolerance the exact path meets


def test_gradient_checkpointing_recomputes_the_packed_forward_exactly():
    """``model.gradient_checkpointing``: the backward recomputes each decoder layer; the conv
    layers must convolve along the same predecessor chains then (they get them as arguments),
    or the gradients would be those of a leaky forward. Same logps and gradients as without
    checkpointing, packed and plain."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg(gradient_checkpointing=True)
    ckpt = build_policy(cfg, load_tokenizer(cfg))
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    plain_model = build_policy(cfg, load_tokenizer(cfg))
    assert ckpt.model.layers[0].gradient_checkpointing and ckpt.training
    assert not plain_model.model.layers[0].gradient_checkpointing
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    for pack in (None, 2):
        grads = []
        for m in (plain_model, ckpt):
            m.zero_grad()
            out = completion_logps(m, *args, pack=pack).sequence_sum()
            (out * torch.arange(1.0, 9.0)).sum().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("k", [1, 4])
def test_listwise_and_single_completion_rows_pack_exactly(model, k):
    lens = [[3 + (i + j) % 5 for i in range(3)] for j in range(k)]
    batch = _batch([6, 2, 8], lens, k=k, seed=k)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        plain = completion_logps(model, *args).sequence_sum()
        packed = completion_logps(model, *args, pack=k, pack_max_tokens=30).sequence_sum()
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)


def test_rows_with_different_prompts_are_packed_but_not_shared(model):
    """KTO's mismatched block: rows of one "example" whose prompts differ stay separate."""
    a = _batch([4, 6], [[3, 2], [5, 4]], k=2, seed=1)
    b = _batch([5, 3], [[3, 2], [5, 4]], k=2, seed=2)
    # rows 0,1 from a's first block, rows 2,3 from b's second block: prompts differ pairwise
    rows = [(a, 0), (a, 1), (b, 2), (b, 3)]
    seqs = []
    for src, r in rows:
        n = int(src["attention_mask"][r].sum())
        split = int(src["loss_mask"][r].long().argmax())
        ids = src["input_ids"][r, :n].tolist()
        seqs.append((ids[:split], ids[split:]))
    batch = pad_rows(seqs, 0)
    pb = packing.pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], 2)
    assert pb.num_tokens == int(batch["attention_mask"].sum())  # nothing shared
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, *args, pack=2).sequence_sum(),
                                   completion_logps(model, *args).sequence_sum(),
                                   atol=1e-5, rtol=0)


def test_sharing_runs_each_prompt_once_and_drops_padding():
    batch = _batch(**PAIRS)
    pb = packing.pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], 2)
    prompts, completions = sum(PAIRS["prompt_lens"]), sum(map(sum, PAIRS["completion_lens"]))
    assert pb.num_tokens == prompts + completions
    assert pb.input_ids.shape == (1, prompts + completions)


def test_tree_conv_equals_conv1d_on_plain_sequences():
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 7, 5), torch.randn(5, 3), torch.randn(5)
    prev = torch.arange(-1, 6).expand(2, 7)
    want = F.conv1d(x.mT, w[:, None], bias, padding=2, groups=5)[..., :7].mT
    got = packing.tree_conv(x, packing.chain_taps(prev, 3), w, bias)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tree_conv_follows_each_tokens_predecessor_chain(k):
    """Out of row order, across branches and group starts: token t's output is
    w[K-1]·x[t] + w[K-2]·x[prev(t)] + w[K-3]·x[prev(prev(t))] + … + bias, zero past a start."""
    torch.manual_seed(0)
    # row 0: prompt 0-2, branch A 3-4, branch B 5-6 (from 2); row 1: a group of 2, then one of 3
    prev = torch.tensor([[-1, 0, 1, 2, 3, 2, 5], [-1, 0, -1, 2, 3, -1, -1]])
    x, w, bias = torch.randn(2, 7, 4), torch.randn(4, k), torch.randn(4)
    want = torch.empty_like(x)
    for r in range(2):
        for t in range(7):
            acc, node = bias + w[:, k - 1] * x[r, t], t
            for j in range(k - 2, -1, -1):
                node = int(prev[r, node]) if node >= 0 else -1
                if node >= 0:
                    acc = acc + w[:, j] * x[r, node]
            want[r, t] = acc
    got = packing.tree_conv(x, packing.chain_taps(prev, k), w, bias)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k,dtype", [(2, torch.float32), (3, torch.float32),
                                     (2, torch.bfloat16)])
def test_the_chain_convolutions_gathering_backward_is_bitwise_the_scatter(k, dtype):
    """``tree_conv`` with :func:`tap_readers` (each row's gradient gathered from the positions
    that read it) gives bitwise the values and gradients of ``index_add``'s scatter, on a
    packed layout with shared prompts, completions that start alike, an empty prompt and
    padding."""
    lens = [[3 + (i + j) % 4 for i in range(4)] for j in range(k)]
    batch = _batch([6, 0, 9, 4], lens, k=k, seed=3)
    batch["input_ids"][0::4, 6] = batch["input_ids"][0, 6]  # example 0's completions start alike
    pb = packing.pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], k,
                      max_tokens=40, multiple_of=16)
    assert pb.num_tokens == 19 + sum(map(sum, lens)) - (k - 1)  # that first token once
    assert pb.fanout == k
    taps = packing.chain_taps(pb.prev, 3)
    readers = packing.tap_readers(taps, pb.fanout)
    flat = torch.arange(taps.shape[1])
    for tap, table in zip(taps, readers):  # each row lists exactly the positions reading it
        for row in range(taps.shape[1]):
            reading = flat[tap == row].tolist()
            if row < taps.shape[1]:  # the zero row's readers are not kept
                assert table[row].tolist() == reading + [taps.shape[1]] * (k - len(reading))
    torch.manual_seed(0)
    r, n = pb.prev.shape
    x = torch.randn(r, n, 8, dtype=dtype, requires_grad=True)
    w, bias = torch.randn(8, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    grad = torch.randn(r, n, 8, dtype=dtype)
    results = []
    for tables in (None, readers):
        x.grad = w.grad = bias.grad = None
        out = packing.tree_conv(x, taps, w, bias, tables)
        out.backward(grad)
        results.append([out.detach(), x.grad, w.grad, bias.grad])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_packed_scoring_with_the_gathering_backward_equals_the_scatter(model, monkeypatch):
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    scatter = scores_and_grads(model, args, pack=2)
    monkeypatch.setattr(packing, "GATHER_BACKWARD_DEVICES", ("cpu",))
    calls = []
    real = packing._TapGather.apply
    monkeypatch.setattr(packing._TapGather, "apply",
                        lambda *a: calls.append(1) or real(*a))
    gathered = scores_and_grads(model, args, pack=2)
    assert len(calls) == 2 * 2  # two conv layers, two taps each
    assert_same_scores_and_grads(gathered, scatter, atol=0, rtol=0)


def test_a_layout_without_branches_has_fanout_one_and_a_reader_past_it_is_caught():
    batch = _batch([5, 3], [[4, 2]], k=1, seed=0)
    pb = packing.pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], 1)
    assert pb.fanout == 1
    branching = _batch([5, 3], [[4, 2], [3, 3]], k=2, seed=0)
    pb = packing.pack(branching["input_ids"], branching["attention_mask"],
                      branching["loss_mask"], 2)
    with pytest.raises(RuntimeError, match="more than fanout"):
        packing.tap_readers(packing.chain_taps(pb.prev, 3), 1)


def test_dpo_training_with_and_without_packing_gives_the_same_losses(compose_cfg, tmp_path):
    runs = {pack: dpo_losses(compose_cfg, tmp_path / pack, f"method.pack={pack}", steps=4)
            for pack in ("false", "true")}
    assert len(runs["true"]) == 4
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)


def test_completions_that_start_alike_share_their_common_start(model):
    """A token trie: c1 = abc, c2 = ad, c3 = abe share 'a' (and c1/c3 'ab'); each row's scores
    still equal its own separate row. Also the order case where creation order is not
    depth-first (the layout is re-ordered so every subtree is one interval)."""
    prompt = [11, 12, 13, 14]
    a, b, c, d, e = 21, 22, 23, 24, 25
    completions = [[a, b, c, 9], [a, d, 9], [a, b, e, 9]]
    seqs = [(prompt, x) for x in completions] + [([15, 16], [a, b]), ([15, 16], [a, b, c])]
    batch = pad_rows(seqs, 0)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    pb = packing.pack(*args, k=1)  # k=1: every row its own example ...
    assert pb.num_tokens == int(batch["attention_mask"].sum())  # ... so nothing is shared
    batch3 = pad_rows(seqs[:3], 0)
    args3 = (batch3["input_ids"], batch3["attention_mask"], batch3["loss_mask"])
    pb3 = packing.pack(*args3, k=3)
    assert pb3.num_tokens == len(prompt) + len({"a", "ab", "abc", "abc9", "ad", "ad9", "abe",
                                                "abe9"})
    with torch.no_grad():
        for b_, k in ((batch3, 3), (pad_rows(seqs[3:], 0), 2)):
            args = (b_["input_ids"], b_["attention_mask"], b_["loss_mask"])
            torch.testing.assert_close(completion_logps(model, *args, pack=k).logps,
                                       completion_logps(model, *args).logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 2048])
def test_shared_head_chunks_give_the_plain_scores(model, chunk_size):
    """The LM head runs once per distinct predicting node, in chunks; every per-token field
    (log-prob, mean log-prob, entropy, argmax) still equals the plain path's."""
    prompt = [11, 12, 13]
    seqs = [(prompt, [21, 22, 23, 9]), (prompt, [21, 22, 9])]
    batch = pad_rows(seqs, 0)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        plain = completion_logps(model, *args, with_mean_logp=True)
        packed = completion_logps(model, *args, with_mean_logp=True, pack=2,
                                  chunk_size=chunk_size)
    for field in ("logps", "mean_logp", "entropy"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), atol=1e-5,
                                   rtol=0)
    assert torch.equal(packed.correct, plain.correct) and torch.equal(packed.rows, plain.rows)


@pytest.mark.slow
def test_bench_script_smoke_on_a_tiny_fixture(tmp_path):
    """scripts/bench_dpo.py builds its fixtures and runs ptlight's real training path (TRL is
    an optional extra: not needed here). Tiny sizes; the real benchmark is not run by CI."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_dpo.py"), "--out", str(tmp_path),
         "--fixtures", "tiny", "--precisions", "32-true", "--frameworks", "ptlight",
         "--steps", "1", "--warmup", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads((tmp_path / "bench.json").read_text())[0]
    fast = rec["ptlight"]["fast"]
    assert rec["fixture"] == "tiny" and rec["ptlight_pairs_per_s"] > 0
    assert fast["tokens_run_per_step"] < fast["tokens_per_step"]  # the prompt ran once per pair
    assert (tmp_path / "bench.md").read_text().startswith("| fixture |")


def _lean_against_stock(device: str, autocast: bool) -> None:
    """The lean MLPs' logps and every gradient are bitwise the stock layers', and they keep
    a = w1(x) and b = w3(x) only of the four [T, F] activations, in fp32 or under autocast."""
    from ptlight.engine.lean import install_lean_mlp

    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    stock = build_policy(cfg, load_tokenizer(cfg)).to(device)
    lean = copy.deepcopy(stock)
    assert install_lean_mlp(lean) == 3
    batch = _batch(**PAIRS)
    args = tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    results = []
    for m in (stock, lean):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = completion_logps(m, *args, pack=2).sequence_sum()
        (out * torch.arange(1.0, 9.0, device=device)).sum().backward()
        width = m.config.intermediate_size  # activations [rows, T, F]; weights are 2-D
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()},
                        len({t.untyped_storage().data_ptr() for t in saved
                             if t.dim() == 3 and t.shape[-1] == width})))
    assert torch.equal(results[1][0], results[0][0])
    for name, g in results[0][1].items():
        assert g.dtype == torch.float32 and torch.equal(results[1][1][name], g), name
    assert results[1][2] == 2 * 3 < results[0][2]  # a and b per layer, nothing else that wide
    assert all(m._ptl_lean_calls == 1 for m in lean.modules() if hasattr(m, "_ptl_lean_calls"))
    with torch.no_grad():  # a no_grad forward takes the stock layer (it saves nothing)
        completion_logps(lean, *args)
    assert all(m._ptl_lean_calls == 1 for m in lean.modules() if hasattr(m, "_ptl_lean_calls"))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lean_layers_give_the_stock_values_and_gradients_and_save_less(autocast, monkeypatch):
    """``ptlight.engine.lean`` in fp32 and under bf16 autocast (``bf16-mixed``), whose path
    serves CUDA autocast; here CPU autocast's native bf16 kernels stand in for it."""
    monkeypatch.setattr("ptlight.engine.lean.AUTOCAST_DEVICES", ("cuda", "cpu"))
    _lean_against_stock("cpu", autocast)


def test_lean_layers_keep_the_stock_layer_under_cpu_autocast():
    """CPU bf16-mixed keeps the stock MLP: under ``cpu_bf16=upcast`` its GEMMs are rounded
    fp32 ones, which the lean node (autocast off inside) would not get."""
    from ptlight.engine.lean import install_lean_mlp

    cfg = tiny_model_cfg()
    model = build_policy(cfg, load_tokenizer(cfg))
    assert install_lean_mlp(model) == 3
    batch = _batch(**PAIRS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert all(m._ptl_lean_calls == 0 for m in model.modules() if hasattr(m, "_ptl_lean_calls"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lean_layers_are_bitwise_the_stock_layers_under_cuda_bf16_autocast():
    """What ``trainer.precision=bf16-mixed`` runs on a GPU: cuBLAS bf16 products, the same
    operands as the stock layers'."""
    _lean_against_stock("cuda", True)


@pytest.mark.parametrize("multiple_of", [1, 16, 128])
def test_rounded_packed_width_gives_the_same_scores_and_gradients(model, multiple_of):
    """``method.pack_multiple_of``: the packed rows are padded to a multiple of it; the padding
    sees only itself, so scores and gradients are those of the unrounded layout."""
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    layout = packing.pack_checked(*args, 2, 2048, multiple_of=multiple_of)
    assert layout.input_ids.shape[1] % multiple_of == 0
    assert_same_scores_and_grads(scores_and_grads(model, args, pack=2, packed=layout),
                                 scores_and_grads(model, args, pack=2), 1e-5, 1e-4)
    model.zero_grad()


def test_collate_builds_the_packed_layout_on_the_host(compose_cfg):
    """With ``pack_rows`` set (the preference methods set it when they pack), every batch
    carries its packed layout, built by the collate on CPU tensors; sft batches never do."""
    from ptlight.data.module import PtlDataModule

    cfg = compose_cfg("method=dpo", *TINY)
    dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), "pairwise")
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert "packed" not in batch
    dm.pack_rows = {"max_tokens": 2048, "multiple_of": 64}
    batch = next(iter(dm.val_dataloader()))
    want = packing.pack_checked(batch["input_ids"], batch["attention_mask"],
                                batch["loss_mask"], 2, 2048, multiple_of=64)
    got = batch["packed"]
    assert got.input_ids.device.type == "cpu" and got.input_ids.shape[1] % 64 == 0
    for field in ("input_ids", "position_ids", "prev", "end", "src", "targets", "rows",
                  "positions", "inverse"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    moved = got.to("cpu")
    assert moved.num_tokens == got.num_tokens and torch.equal(moved.src, got.src)


def test_dpo_training_takes_the_collated_layout(compose_cfg, tmp_path, monkeypatch):
    """A packing DPO run scores every batch from the layout its collate built (no packing in
    the step), and its losses are the unpacked run's."""
    from ptlight.engine import logps as logps_module

    built_in_step = []
    real = logps_module.pack_checked
    monkeypatch.setattr(logps_module, "pack_checked",
                        lambda *a, **k: built_in_step.append(1) or real(*a, **k))
    runs = {pack: dpo_losses(compose_cfg, tmp_path / pack, f"method.pack={pack}",
                             "method.pack_multiple_of=32") for pack in ("false", "true")}
    assert not built_in_step
    assert len(runs["true"]) == 3
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)


@pytest.mark.slow
def test_collating_in_worker_processes_gives_the_same_training(compose_cfg, tmp_path):
    """``data.num_workers=2``: batches (and their packed layouts) are built in worker
    processes, in the same order, so the losses are those of the main-process collate."""
    runs = {workers: dpo_losses(compose_cfg, tmp_path / workers, "method.pack=true",
                                f"data.num_workers={workers}") for workers in ("0", "2")}
    assert len(runs["2"]) == 3
    assert runs["2"] == runs["0"]


def test_data_pin_memory_asks_the_loader_to_pin_where_cuda_is_visible(compose_cfg, tmp_path,
                                                                     monkeypatch):
    """``data.pin_memory=true``: the training loader pins each batch where CUDA is visible
    (and only there: without a GPU there is nothing to pin for); the packed layout knows how
    to pin itself, and goes to a CUDA device with non-blocking copies, as Lightning sends the
    batch's tensors."""
    from ptlight.data.module import PtlDataModule

    for pin, visible in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=visible: v)
        cfg = compose_cfg("method=dpo", *TINY, f"data.pin_memory={str(pin).lower()}")
        dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), "pairwise")
        dm.setup("fit")
        assert dm.train_dataloader().pin_memory is (pin and visible)
    batch = _batch(**PAIRS)
    layout = packing.pack_checked(batch["input_ids"], batch["attention_mask"],
                                  batch["loss_mask"], 2, 2048)
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda t, device, non_blocking=False: calls.append(non_blocking) or t)
    layout.pin_memory()
    layout.to("cuda")
    layout.to("cpu")
    n = len(calls) // 3
    assert calls == ["pin"] * n + [True] * n + [False] * n and n == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pinned_collated_batch_reaches_the_gpu_without_waiting_on_it():
    """``data.pin_memory=true`` and the packed layout's non-blocking copies: Lightning's move of
    a collated packed batch to the GPU makes no host sync (torch's sync debug mode would
    raise), so the next step's work queues behind the last step's kernels."""
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = _batch(**PAIRS)
    batch["packed"] = packing.pack_checked(batch["input_ids"], batch["attention_mask"],
                                           batch["loss_mask"], 2, 2048, multiple_of=16)
    pinned = pin_memory(batch)
    assert all(t.is_pinned() for t in pinned.values() if isinstance(t, torch.Tensor))
    assert pinned["packed"].input_ids.is_pinned()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = move_data_to_device(pinned, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved["packed"].end.is_cuda and moved["input_ids"].is_cuda


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pack", [None, 2])
def test_scoring_from_collated_indices_never_waits_on_the_device(pack):
    """The policy's forward and backward, given what the collate built (the packed layout,
    or the completion index of the padded rows), make no device-to-host synchronisation
    (torch's sync debug mode turns one into an error). The padded path builds its attention
    and convolution masks without asking the host whether a row is padded
    (:mod:`ptlight.model.masks`; on an H200 with transformers 5.17 it synchronised there
    before)."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    model = build_policy(cfg, load_tokenizer(cfg)).cuda()
    batch = _batch(**PAIRS)
    ahead = (dict(packed=packing.pack_checked(batch["input_ids"], batch["attention_mask"],
                                              batch["loss_mask"], 2, 2048,
                                              multiple_of=16).to("cuda"))
             if pack else dict(index=completion_index(batch["loss_mask"]).cuda()))
    args = [batch[k].cuda() for k in ("input_ids", "attention_mask", "loss_mask")]
    completion_logps(model, *args, pack=pack, **ahead).sequence_sum().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = completion_logps(model, *args, pack=pack, **ahead)
        (scores.sequence_sum().sum() + scores.to_dense().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("lengths", [PAIRS, dict(prompt_lens=[3, 1], completion_lens=[[0, 2],
                                                                                      [1, 0]])])
def test_a_collated_completion_index_gives_the_same_scores_and_gradients(model, lengths):
    """The unpacked path with ``index=`` (built by the collate) selects the same positions,
    in the same order, as the boolean mask it replaces, rows without completion included."""
    batch = _batch(**lengths)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    index = completion_index(batch["loss_mask"])
    width = batch["loss_mask"].shape[1]
    assert torch.equal(index, batch["loss_mask"][:, 1:].nonzero() @ torch.tensor([width, 1]))
    with torch.no_grad():
        got = completion_logps(model, *args, index=index)
        want = completion_logps(model, *args)
    for field in ("logps", "rows", "correct", "entropy", "mask"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert_same_scores_and_grads(scores_and_grads(model, args, index=index),
                                 scores_and_grads(model, args), 0, 0)
    model.zero_grad()


def test_completion_logits_from_a_collated_index_equal_the_masked_ones(model):
    """R-Drop's full-vocabulary logits from the collated completion index: the same rows,
    targets, logits and parameter gradients as the boolean mask gives."""
    batch = _batch(**PAIRS)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    weights = None
    grads = []
    for index in (completion_index(batch["loss_mask"]), None):
        model.zero_grad()
        out = completion_logits(model, *args, index)
        if weights is None:
            weights = torch.randn(out.logits.shape)
            first = out
        (out.logits * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for field in ("logits", "targets", "rows"):
        assert torch.equal(getattr(first, field), getattr(out, field)), field
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    model.zero_grad()


@pytest.mark.parametrize("mask", [[[1, 0, 1, 1], [0, 1, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]],
                         ids=["some", "none"])
def test_dense_completion_values_equal_masked_scatter_with_gradients(mask):
    """``TokenScores.to_dense`` (what SFT's objective reads) puts each value where
    ``masked_scatter`` puts it and zeros elsewhere, and sends back the same gradient, an
    all-masked batch included."""
    from ptlight.engine.logps import TokenScores

    mask = torch.tensor(mask, dtype=torch.bool)
    weights = torch.randn(mask.shape)
    values = torch.randn(int(mask.sum()), dtype=torch.float64).float().requires_grad_()
    plain = values.detach().clone().requires_grad_()
    scores = TokenScores(values, torch.zeros(0), torch.zeros(0), torch.zeros(0), None, mask)
    got = scores.to_dense()
    want = torch.zeros(mask.shape).masked_scatter(mask, plain)
    assert torch.equal(got, want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.equal(values.grad, plain.grad)


def test_every_collated_batch_carries_its_completion_index(compose_cfg):
    from ptlight.data.module import PtlDataModule

    cfg = compose_cfg("method=sft", *TINY)
    dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), "sft")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["completion_index"], completion_index(batch["loss_mask"]))


def test_bench_packed_conv_script_checks_and_times_the_chain_convolution():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_packed_conv.py"
    out = subprocess.run([sys.executable, str(script), "--shapes", "2x600x8", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 2x600x8 |")]
    assert [r.split(" | ")[1] for r in rows] == ["float32", "bfloat16"]
