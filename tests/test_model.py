"""Backbone loading (offline errors that say what to do), log-prob parity, batched generation."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import tiny_model_cfg
from ptlight.model.backbone import build_policy, frozen_copy, load_tokenizer
from ptlight.errors import ModelLoadError
from ptlight.eval.gold import generate
from ptlight.engine.logps import completion_logps


@pytest.fixture(scope="module")
def tiny(request):
    cfg = tiny_model_cfg()
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    return cfg, tok, build_policy(cfg, tok)


def test_tiny_model_is_a_real_lfm2(tiny):
    _, tok, model = tiny
    assert type(model).__name__ == "Lfm2ForCausalLM"
    assert model.config.layer_types == ["conv", "conv", "full_attention"]
    assert model.config.eos_token_id == tok.eos_token_id != tok.pad_token_id
    assert "<|im_start|>" in tok.chat_template


def test_completion_logps_equal_plain_log_softmax_gather(tiny):
    _, _, model = tiny
    torch.manual_seed(1)
    ids = torch.randint(3, 600, (3, 17))
    attn = torch.ones_like(ids)
    attn[2, 12:] = 0  # right padding on one row
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 6:] = True
    loss_mask &= attn.bool()
    scores = completion_logps(model, ids, attn, loss_mask, chunk_size=5)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    plain = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (plain * loss_mask[:, 1:]).sum(1)
    torch.testing.assert_close(scores.sequence_sum(), expected, atol=1e-5, rtol=0)
    assert scores.lengths().tolist() == loss_mask[:, 1:].sum(1).tolist()


def test_frozen_reference_is_a_detached_copy(tiny):
    _, _, model = tiny
    ref = frozen_copy(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), model.parameters()))


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    """LFM2's short convolutions must not see the pad tokens of shorter prompts."""
    _, tok, model = tiny
    prompts = [[{"role": "user", "content": t}] for t in
               ("Sort these words alphabetically: kiwi apple", "hi", "a much longer prompt " * 3)]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_export_reloads_with_plain_transformers(tiny, tmp_path):
    _, tok, model = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.create({"path": "LiquidAI/LFM2-350M", "tokenizer": None,
                            "trust_remote_code": False})
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(cfg)
    msg = str(err.value)
    assert "LiquidAI/LFM2-350M" in msg and "model.path=" in msg and "model=lfm2-tiny" in msg


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cfg = OmegaConf.create({"path": str(tmp_path), "tokenizer": None, "trust_remote_code": False})
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_tokenizer(cfg)


def test_unreachable_hub_fails_in_seconds_not_after_retries(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = OmegaConf.create({"path": "LiquidAI/LFM2-350M", "tokenizer": None,
                            "trust_remote_code": False})
    start = time.time()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_tokenizer(cfg)
    assert time.time() - start < 10
