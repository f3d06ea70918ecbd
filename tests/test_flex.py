"""``model.packed_attention=flex``: packed scoring through FlexAttention with the trie mask as a
block-sparse ``BlockMask`` (ptlight/engine/flex.py) gives the dense-mask SDPA scores; refused
where it cannot train (the CPU) or would not run (no packing); on a GPU, the same scores and
gradients under bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import TINY, prompt_block_batch, tiny_model_cfg
from ptlight.engine import flex, packing
from ptlight.engine.logps import completion_logps
from ptlight.errors import ConfigError
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.train import train_stage


def _batch(**lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = prompt_block_batch(**lengths)
    return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]


PAIRS = dict(prompt_lens=[5, 9, 1, 7, 40, 60], completion_lens=[[4, 1, 6, 3, 30, 20],
                                                                 [7, 3, 2, 5, 25, 35]])


def _policies(device: str = "cpu"):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    plain = build_policy(cfg, load_tokenizer(cfg)).to(device)
    flexed = copy.deepcopy(plain)
    assert flex.install_flex_attention(flexed) == 1 and flex.uses_flex(flexed.model)
    assert not flex.uses_flex(plain.model)
    return plain, flexed


def test_flex_packed_scores_equal_the_dense_tree_mask(monkeypatch):
    """A no-grad packed forward (what the reference precompute runs) through FlexAttention
    with the ``BlockMask`` gives SDPA's scores with the dense mask; the dense mask is never
    built, and FlexAttention is what ran."""
    plain, flexed = _policies()
    plain.eval(), flexed.eval()
    args = _batch(**PAIRS)
    layout = packing.pack_checked(*args, 2, 2048, multiple_of=128)
    with torch.no_grad():
        want = completion_logps(plain, *args, pack=2, packed=layout)
        calls = []
        real = flex.flex_attention
        monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(packing.PackedBatch, "attention_mask",
                            lambda self: pytest.fail("the dense mask was built"))
        got = completion_logps(flexed, *args, pack=2, packed=layout)
    assert calls == [1]  # the one attention layer of the tiny LFM2
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.mask, want.mask)


def test_the_block_mask_is_the_tree_mask_and_skips_whole_blocks():
    """``tree_block_mask``: the rule of ``PackedBatch.attention_mask`` pair by pair, and at a
    width of several blocks it leaves blocks out (above the diagonal, between groups)."""
    from torch.nn.attention.flex_attention import create_mask

    layout = packing.pack_checked(*_batch(**PAIRS), 2, 160, multiple_of=128)
    rows, width = layout.end.shape
    assert width == 256 and rows > 1
    block_mask = flex.tree_block_mask(layout.end)
    dense = create_mask(block_mask.mask_mod, rows, 1, width, width, device="cpu")
    assert torch.equal(dense, layout.attention_mask())
    assert block_mask.sparsity() > 0


def test_an_attention_layer_keeps_the_stock_forward_for_any_other_mask():
    """Generation and the padded path pass tensors or None: the stock forward, bitwise."""
    plain, flexed = _policies()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(flexed(input_ids=ids).logits, plain(input_ids=ids).logits)
        out = flexed.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, plain.generate(ids, max_new_tokens=3, do_sample=False))


def test_flex_is_refused_before_weights_load_where_it_cannot_train(compose_cfg, tmp_path,
                                                                  no_weights):
    with pytest.raises(ConfigError, match=r"model\.packed_attention=flex: torch's FlexAttention "
                                          r"has no backward on the CPU"):
        train_stage(compose_cfg("method=dpo", *TINY, "model.packed_attention=flex"), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.packed_attention='dense': .* use sdpa"):
        train_stage(compose_cfg("method=dpo", *TINY, "model.packed_attention=dense"), tmp_path)


def test_flex_is_refused_for_a_run_that_does_not_pack(compose_cfg, tmp_path, monkeypatch,
                                                     no_weights):
    """On CUDA (faked here: the check runs before any device work), a run that never packs
    would ignore the key: refused, naming why."""
    import ptlight.train

    monkeypatch.setattr(ptlight.train, "uses_cuda", lambda trainer: True)
    monkeypatch.setattr(ptlight.train, "configure_cuda", lambda *a: None)
    with pytest.raises(ConfigError, match=r"packed_attention=flex .* does not pack: "
                                          r"method\.pack is false"):
        train_stage(compose_cfg("method=dpo", *TINY, "model.packed_attention=flex",
                                "method.pack=false"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_packed_scores_and_gradients_equal_sdpa_under_cuda_bf16_autocast():
    """What ``trainer.precision=bf16-mixed model.packed_attention=flex`` trains with: the
    packed forward and backward through compiled FlexAttention against SDPA with the dense
    mask, in bf16 (so within bf16 rounding), and no host sync inside the step."""
    plain, flexed = _policies("cuda")
    args = [t.cuda() for t in _batch(**PAIRS)]
    layout = packing.pack_checked(*[t.cpu() for t in args], 2, 2048, multiple_of=128).to("cuda")
    results = []
    for m in (plain, flexed, flexed):  # flexed twice: compiled, then timed against syncs
        m.zero_grad()
        if len(results) == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                scores = completion_logps(m, *args, pack=2, packed=layout)
            scores.sequence_sum().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((scores.logps.detach().float(),
                        [p.grad.float().clone() for p in m.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=5e-2, rtol=2e-2)
    for g, w in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2)
