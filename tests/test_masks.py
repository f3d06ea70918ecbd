"""Left padding never hands SDPA a query row that attends to nothing (ptlight.model.masks):
real tokens' outputs are bitwise unchanged, and a kernel that returns NaN for such rows (as
CUDA kernels do) no longer poisons the batch."""

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import AttentionMaskInterface

from helpers import tiny_model_cfg
from ptlight.model import masks
from ptlight.model.backbone import build_policy, load_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    cfg.arch.layer_types = ["conv", "full_attention", "conv"]  # a layer after the attention
    return build_policy(cfg, load_tokenizer(cfg)).eval()


def _left_padded():
    ids = torch.randint(5, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :5] = 0  # 5 pad positions on the left
    attn[1, :1] = 0
    ids = ids.masked_fill(attn == 0, 0)
    return ids, attn


def _nan_on_unattended_rows(real):
    """SDPA as CUDA kernels behave: NaN for a query row whose mask is all False."""
    def sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        out = real(q, k, v, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            dead = ~attn_mask.any(-1, keepdim=True)  # [B, 1, Q, 1]
            out = out.masked_fill(dead.expand(-1, out.shape[1], -1, 1), float("nan"))
        return out
    return sdpa


def test_building_a_model_installs_the_fix_once(model):
    fn = AttentionMaskInterface._global_mapping["sdpa"]
    masks.install()
    assert AttentionMaskInterface._global_mapping["sdpa"] is fn
    assert getattr(fn, "_ptlight_unattended_rows_fixed", False)


def test_real_tokens_are_bitwise_unchanged(model, monkeypatch):
    ids, attn = _left_padded()
    with torch.no_grad():
        fixed = model(input_ids=ids, attention_mask=attn).logits
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa",
                            AttentionMaskInterface._global_mapping["sdpa"].__wrapped__)
        stock = model(input_ids=ids, attention_mask=attn).logits
    real = attn.bool()
    assert torch.equal(fixed[real], stock[real])


def test_a_kernel_that_returns_nan_for_unattended_rows_no_longer_poisons_real_tokens(
        model, monkeypatch):
    ids, attn = _left_padded()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attn).logits
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        _nan_on_unattended_rows(F.scaled_dot_product_attention))
    real = attn.bool()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=attn).logits
        assert torch.isfinite(got[real]).all()
        torch.testing.assert_close(got[real], want[real], atol=0, rtol=0)
        # what the stock mask does with such a kernel: the NaN reaches the real tokens
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa",
                            AttentionMaskInterface._global_mapping["sdpa"].__wrapped__)
        stock = model(input_ids=ids, attention_mask=attn).logits
    assert torch.isnan(stock[0][real[0]]).any()


def test_only_rows_without_any_true_entry_change():
    mask = torch.tensor([[[[False, False, False],
                           [False, True, False],
                           [False, True, True]]]])
    fixed = masks.attend_somewhere(mask)
    assert fixed[0, 0, 0].all() and torch.equal(fixed[0, 0, 1:], mask[0, 0, 1:])
    assert masks.attend_somewhere(None) is None


def test_off_the_cpu_padding_masks_are_built_without_reading_them():
    """On a device whose values the host cannot read without waiting (``meta`` stands in for
    CUDA here: it has no values at all), transformers' attention mask and recurrent padding
    mask read the padding mask to decide whether to skip it; ptlight's build them from it on
    the device. One query (decoding) and the CPU keep transformers' skip."""
    from transformers import masking_utils
    from transformers.models.lfm2 import modeling_lfm2

    sdpa = AttentionMaskInterface._global_mapping["sdpa"]
    recurrent = modeling_lfm2.create_recurrent_attention_mask
    assert recurrent.__wrapped__ is masking_utils.create_recurrent_attention_mask
    padding = torch.ones(2, 7, dtype=torch.bool, device="meta")
    embeds = torch.empty(2, 7, 16, device="meta")
    for stock_call in (lambda: sdpa.__wrapped__(batch_size=2, q_length=7, kv_length=7,
                                                attention_mask=padding, device="meta"),
                       lambda: recurrent.__wrapped__(None, embeds, padding)):
        with pytest.raises(RuntimeError, match="meta"):  # a read of the values
            stock_call()
    built = sdpa(batch_size=2, q_length=7, kv_length=7, attention_mask=padding, device="meta")
    assert built.shape == (2, 1, 7, 7) and built.dtype == torch.bool
    assert recurrent(None, embeds, padding).shape == (2, 7)
    ones = torch.ones(2, 7, dtype=torch.bool)
    assert sdpa(batch_size=2, q_length=7, kv_length=7, attention_mask=ones) is None
    assert recurrent(None, torch.empty(2, 7, 16), ones) is None
    assert sdpa(batch_size=2, q_length=1, kv_length=7, q_offset=6, attention_mask=ones) is None


@pytest.mark.parametrize("padded", [False, True])
def test_masks_built_on_the_device_give_the_stock_outputs_and_gradients(model, monkeypatch,
                                                                        padded):
    """The masks as built off the CPU (forced on the CPU here), against transformers' own:
    the same logits and gradients, bitwise with padding (both build the masks), and within
    rounding without (SDPA's causal flag against the causal mask it stands for)."""
    ids, attn = _left_padded()
    if not padded:
        attn = torch.ones_like(attn)

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        logits.float().logsumexp(-1)[attn.bool()].sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    stock = run()
    monkeypatch.setattr(masks, "HOST_SKIP_DEVICES", ())
    built = run()
    model.zero_grad()
    real = attn.bool()
    tol = dict(rtol=0, atol=0) if padded else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(built[0][real], stock[0][real], **tol)
    for got, want in zip(built[1], stock[1]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_left_padded_rows_match_their_unpadded_selves_on_cuda(model, dtype):
    """What PPO and GRPO score: left-padded rollouts, on CUDA's SDPA kernels. Each row's real
    tokens get the logits the row gets alone, without padding."""
    gpu = type(model)(model.config).to("cuda", dtype)  # a CUDA copy of the fixture's weights
    gpu.load_state_dict(model.state_dict())
    gpu.eval()
    ids, attn = _left_padded()
    ids, attn = ids.cuda(), attn.cuda()
    with torch.no_grad():
        batch = gpu(input_ids=ids, attention_mask=attn).logits.float()
        for row in range(ids.shape[0]):
            real = attn[row].bool()
            alone = gpu(input_ids=ids[row][real][None]).logits.float()[0]
            assert torch.isfinite(batch[row][real]).all()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(batch[row][real], alone, atol=tol, rtol=tol)
