"""The DPO family, KTO, listwise objectives and R-Drop wired into the methods: one training step
per ``method=<name>`` through the real pipeline, plus the batch layouts they rely on."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import tiny_model_cfg, TINY
from ptlight.model.backbone import build_policy, load_tokenizer
from ptlight.model.reference import FrozenCopy
from ptlight.data.module import PtlDataModule, mismatched_pairs
from ptlight.errors import ConfigError
from ptlight.methods.preference import PreferenceMethod
from ptlight.methods.sft import SFTMethod, active_dropout
from ptlight.objectives import get_objective
from ptlight.train import train_stage

ONE_STEP = [
    *TINY, "trainer.max_steps=1", "trainer.val_check_interval=1",
    "checkpoint.every_n_train_steps=1", "data.num_train=16", "data.val_size=4",
    "data.batch_size=4", "eval.before=false", "eval.num_prompts=2", "eval.max_new_tokens=4",
]
U = [{"role": "user", "content": "Sort these words alphabetically: kiwi apple fig"}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _read_metrics(run_dir: Path) -> dict[str, list[float]]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    cols: dict[str, list[float]] = {h: [] for h in header}
    for line in lines[1:]:
        for h, v in zip(header, line.split(",")):
            if v:
                cols[h].append(float(v))
    return cols


# method, extra overrides, a metric the objective itself logs
RUNS = [
    ("cdpo", [], "train/rewards/margins"),
    ("robust", [], "train/rewards/margins"),
    ("ipo", [], "train/rewards/margins"),
    ("hinge", [], "train/rewards/margins"),
    ("bco_pair", [], "train/rewards/margins"),
    ("rdpo", [], "train/rewards/margins"),
    ("simpo", [], "train/rewards/margins"),
    ("orpo", [], "train/log_odds_ratio"),
    ("slic", [], "train/calibration_loss"),
    ("kto", [], "train/kl"),
    ("rank_debiased", [], "train/rank/ndcg"),
    ("rank_debiased", ["method.reference=precompute"], "train/rank/ndcg"),
    ("listwise_pl", [], "train/rewards/margins"),
    ("rdrop", [], "train/rdrop/kl"),
]


@pytest.mark.parametrize("method,extra,metric", RUNS,
                         ids=[r[0] + ("-" + "-".join(r[1]) if r[1] else "") for r in RUNS])
def test_one_training_step_per_method(compose_cfg, tmp_path, monkeypatch, recwarn, method, extra,
                                      metric):
    cfg = compose_cfg(f"method={method}", *ONE_STEP, *extra)
    if cfg.method.reference == "none":  # reference-free: no frozen copy may be built
        from ptlight.model import backbone

        def no_reference(*a, **k):
            raise AssertionError("a reference model was built for a reference-free objective")

        monkeypatch.setattr(backbone, "frozen_copy", no_reference)
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 1 and report["objective"] == method
    metrics = _read_metrics(tmp_path)
    assert metrics["train/loss"] and all(math.isfinite(v) for v in metrics["train/loss"])
    assert metrics[metric] and all(math.isfinite(v) for v in metrics[metric])
    assert metrics["val/loss"] and math.isfinite(metrics["val/loss"][-1])
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "eval.json").read_text())["after"]["num_prompts"] == 2
    warned = any("R-Drop reduces to SFT" in str(w.message) for w in recwarn)
    assert warned == (method == "rdrop")  # LFM2 has no dropout at all


def test_simpo_and_orpo_configs_are_reference_free(compose_cfg):
    for method in ("simpo", "orpo", "slic"):
        cfg = compose_cfg(f"method={method}")
        assert cfg.method.reference == "none"
        assert not get_objective(cfg.method.objective.name).needs_reference


@pytest.mark.parametrize("overrides,match,before_weights", [
    (["method=kto", "data.batch_size=1"], r"data\.batch_size=1.*at least 2", True),
    (["method=rank_debiased", "method.module=sft"], r"consumes 'listwise' data", True),
    (["method=rdrop", "method.module=preference"], r"consumes 'sft' data", True),
    (["method=kto", "method.reference=precompute"], r"method\.reference=precompute.*copy", False),
])
def test_family_config_mistakes_are_config_errors(compose_cfg, tmp_path, monkeypatch, overrides,
                                                  match, before_weights):
    if before_weights:
        import ptlight.train as train

        def no_weights(*a, **k):
            raise AssertionError("weights were loaded before the config was checked")

        monkeypatch.setattr(train, "build_policy", no_weights)
    with pytest.raises(ConfigError, match=match):
        train_stage(compose_cfg(*TINY, *overrides), tmp_path)


# ---- batch layouts ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(OmegaConf.create({"path": None, "tokenizer": None,
                                            "trust_remote_code": False}))


def _data_cfg(path, **kw):
    base = dict(task=None, path=str(path), val_path=str(path), num_train=0, val_size=4, seed=0,
                batch_size=4, max_length=64, truncation="keep_end", on_bad_row="error")
    return OmegaConf.create({**base, **kw})


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_kto_collate_appends_the_cyclically_shifted_mismatched_rows(tok, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"question number {i}"}],
             "completion": _assistant("answer " * (i + 1)), "label": i % 2 == 0}
            for i in range(4)]
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "u.jsonl", rows)), tok, "unpaired")
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    b = 4
    assert batch["input_ids"].shape[0] == 2 * b
    assert batch["labels"].tolist() == [True, False, True, False]
    for j in range(b):
        row = slice(None, int(batch["attention_mask"][b + j].sum()))
        prompt, completion = dm.val[j].enc.prompt, dm.val[j - 1].enc.completions[0]
        assert batch["input_ids"][b + j][row].tolist() == prompt + completion
        assert batch["input_ids"][b + j][batch["loss_mask"][b + j]].tolist() == completion
        own = dm.val[j].enc.completions[0]
        assert batch["input_ids"][j][batch["loss_mask"][j]].tolist() == own
        assert completion != own  # really mismatched


def test_mismatched_pairs_respect_max_length(tok, tmp_path):
    rows = [{"prompt": "short", "completion": " word " * 20, "label": True},
            {"prompt": "a much longer prompt " * 5, "completion": " ok", "label": False}]
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "u.jsonl", rows), batch_size=2,
                                 max_length=30), tok, "unpaired")
    dm.setup()
    for (prompt, completion), item in zip(mismatched_pairs(dm.val, 30), dm.val):
        assert len(prompt) + len(completion) <= 30 and len(prompt) >= 1
        assert prompt == item.enc.prompt[-len(prompt):]  # the prompt keeps its end


def test_a_last_batch_of_one_unpaired_example_is_dropped(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}", "label": i % 2 == 0} for i in range(5)]
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "u.jsonl", rows), batch_size=2), tok,
                       "unpaired")
    dm.setup()
    assert [len(b["index"]) for b in dm.val_dataloader()] == [2, 2]
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "u.jsonl", rows[:3]), batch_size=2), tok,
                       "unpaired")
    dm.setup()
    assert [len(b["index"]) for b in dm.val_dataloader()] == [2]
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "u.jsonl", rows), batch_size=3), tok,
                       "unpaired")
    dm.setup()
    assert [len(b["index"]) for b in dm.val_dataloader()] == [3, 2]  # 2 is enough: kept


@pytest.fixture(scope="module")
def policy_and_reference(tok):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    policy = build_policy(cfg, tok)
    reference = FrozenCopy(policy)
    with torch.no_grad():  # move the policy away from the reference: margins are not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


@pytest.mark.parametrize("listwise_objective", ["rank_debiased", "listwise_pl"])
def test_listwise_at_k2_through_the_method_equals_dpo(tok, tmp_path, policy_and_reference,
                                                      listwise_objective):
    policy, reference = policy_and_reference
    answers = [("apple fig kiwi", "apple kiwi fig"), ("apple fig kiwi", "apple fig"),
               ("apple fig kiwi", "fig fig kiwi"), ("apple fig kiwi", "apple fig kiwi kiwi")]
    pairs = [{"prompt": U, "chosen": _assistant(c), "rejected": _assistant(r)} for c, r in answers]
    lists = [{"prompt": U, "completions": [_assistant(r), _assistant(c)], "ranks": [2, 1]}
             for c, r in answers]  # worst first on disk: the data module reorders
    losses = {}
    for kind, rows, name in (("pairwise", pairs, "dpo"), ("listwise", lists, listwise_objective)):
        dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / f"{kind}.jsonl", rows)), tok, kind)
        dm.setup()
        batch = next(iter(dm.val_dataloader()))
        method = PreferenceMethod(policy, get_objective(name)(beta=0.5), OmegaConf.create({}),
                                  reference=reference)
        out, _ = method.forward_batch(batch, "val")
        losses[kind] = (out.loss, batch["input_ids"])
    assert torch.equal(losses["pairwise"][1], losses["listwise"][1])  # the same rows
    torch.testing.assert_close(losses["listwise"][0], losses["pairwise"][0], rtol=0, atol=1e-6)
    assert abs(losses["pairwise"][0].item() - math.log(2)) > 1e-3  # policy != reference


def test_listwise_batch_is_k_blocks_best_first_with_scores(tok, tmp_path, policy_and_reference):
    rows = [{"prompt": U, "completions": [_assistant(t) for t in ("b", "a", "c")],
             "scores": [0.5, 1.0, 0.5]}] * 4
    dm = PtlDataModule(_data_cfg(_jsonl(tmp_path / "l.jsonl", rows)), tok, "listwise")
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 3 * 4 and batch["scores"].tolist() == [[1.0, .5, .5]] * 4
    first = [tok.decode(batch["input_ids"][k * 4][batch["loss_mask"][k * 4]]) for k in range(3)]
    assert first == ["a<|im_end|>", "b<|im_end|>", "c<|im_end|>"]  # ties keep their order
    policy, reference = policy_and_reference
    method = PreferenceMethod(policy, get_objective("rank_debiased")(), OmegaConf.create({}),
                              reference=reference)
    out, _ = method.forward_batch(batch, "val")
    assert out.metrics["rank/valid_pairs"].item() == 2 * 4  # (a, b), (a, c); b-c tied


# ---- R-Drop ------------------------------------------------------------------------------------
def test_rdrop_two_passes_differ_only_with_dropout_in_training(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok),
                                  resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert active_dropout(model) == pytest.approx(0.3)
    ids = torch.randint(3, 200, (2, 9))
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 4:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    method = SFTMethod(model, get_objective("rdrop")(alpha=1.0), OmegaConf.create({}))
    model.train()
    out, _ = method.forward_batch(batch)
    assert out.metrics["rdrop/kl"].item() > 1e-4 and out.metrics["num_tokens"].item() == 2 * 5
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    model.eval()
    out, _ = method.forward_batch(batch)
    assert out.metrics["rdrop/kl"].item() == 0.0
    for module in model.modules():  # what model.disable_dropout=true does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert active_dropout(model) == 0.0
