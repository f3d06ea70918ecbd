"""Precomputed reference log-probs on disk: computed once per (weights, tokens, precision),
reused by runs that differ only in what the reference does not depend on (ISSUE 5)."""

import csv

import pytest
import torch

from helpers import TINY
from ptlight.engine import refcache
from ptlight.methods.preference import PreferenceMethod
from ptlight.train import train_stage


@pytest.fixture
def counted(monkeypatch):
    """Counts the reference passes that precompute runs (not the ones a cache hit skips)."""
    calls = []
    original = PreferenceMethod._precompute

    def spy(self, loaders):
        calls.append(1)
        return original(self, loaders)

    monkeypatch.setattr(PreferenceMethod, "_precompute", spy)
    return calls


def _run(compose_cfg, run_dir, cache, *overrides):
    cfg = compose_cfg("method=dpo", "method.reference=precompute",
                      f"method.reference_cache={cache}", "eval.before=false", *TINY, *overrides)
    train_stage(cfg, run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_a_beta_sweep_computes_the_reference_once(compose_cfg, tmp_path, counted):
    cache = tmp_path / "cache"
    _run(compose_cfg, tmp_path / "a", cache, "method.objective.beta=0.1")
    assert len(counted) == 1 and len(list(cache.glob("*.pt"))) == 1
    _run(compose_cfg, tmp_path / "b", cache, "method.objective.beta=0.3")
    _run(compose_cfg, tmp_path / "c", cache, "method=ipo")  # another objective, same reference
    assert len(counted) == 1  # both later runs loaded the file
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("change", ["data.max_length=24", "seed=1", "data.num_train=48",
                                    "trainer.precision=bf16-mixed"])
def test_a_changed_dependency_misses(compose_cfg, tmp_path, counted, change):
    """max_length enters through the token ids: 24 truncates the tiny task's rows (a length
    that truncates nothing leaves the tokens, and so the key, unchanged: a correct hit)."""
    cache = tmp_path / "cache"
    _run(compose_cfg, tmp_path / "a", cache)
    _run(compose_cfg, tmp_path / "b", cache, change, "trainer.max_steps=1")
    assert len(counted) == 2 and len(list(cache.glob("*.pt"))) == 2


def test_cached_reference_gives_the_live_reference_losses(compose_cfg, tmp_path, counted):
    cache = tmp_path / "cache"
    computed = _run(compose_cfg, tmp_path / "a", cache)
    loaded = _run(compose_cfg, tmp_path / "b", cache)
    assert len(counted) == 1
    cfg = compose_cfg("method=dpo", "method.reference=copy", "eval.before=false", *TINY)
    train_stage(cfg, tmp_path / "live")
    rows = list(csv.DictReader(open(tmp_path / "live" / "metrics.csv")))
    live = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert loaded == computed
    assert loaded == pytest.approx(live, abs=1e-5)


def test_null_cache_dir_turns_the_cache_off(compose_cfg, tmp_path, counted):
    _run(compose_cfg, tmp_path / "a", "null")
    _run(compose_cfg, tmp_path / "b", "null")
    assert len(counted) == 2


def test_save_is_atomic_and_a_corrupt_file_is_a_miss(tmp_path):
    splits = {"train": torch.randn(4, 2), "val": torch.randn(2, 2)}
    path = refcache.save(tmp_path, "k1", splits, {"why": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["k1.pt"]
    loaded = refcache.load(tmp_path, "k1")
    assert torch.equal(loaded["train"], splits["train"]) and torch.equal(loaded["val"], splits["val"])
    assert refcache.load(tmp_path, "k2") is None
    path.write_bytes(b"not a torch file")
    assert refcache.load(tmp_path, "k1") is None


def test_key_depends_on_weights_and_tokens():
    w = [("a", torch.ones(3)), ("b", torch.zeros(2))]
    assert refcache.weights_fingerprint(w) == refcache.weights_fingerprint(list(reversed(w)))
    assert refcache.weights_fingerprint(w) != refcache.weights_fingerprint(
        [("a", torch.ones(3)), ("b", torch.tensor([0.0, 1e-7]))])
    batch = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2),
             "loss_mask": torch.tensor([[False, True]]), "index": torch.tensor([0])}
    other = {**batch, "input_ids": torch.tensor([[1, 3]])}
    assert refcache.batches_fingerprint([batch]) != refcache.batches_fingerprint([other])


def test_a_fresh_run_scores_the_reference_with_the_policy_and_makes_no_copy(
        compose_cfg, tmp_path, monkeypatch):
    """No deep copy of the weights in a fresh precompute run (the policy, before its first
    step, is the reference); a resumed run, whose policy holds trained weights, scores with a
    copy of the starting weights, and both give the same values bit for bit."""
    from ptlight.model import backbone

    copies, outputs = [], []
    real_copy, real_precompute = backbone.frozen_copy, PreferenceMethod._precompute
    monkeypatch.setattr(backbone, "frozen_copy", lambda m: copies.append(1) or real_copy(m))

    def spy(self, loaders):
        outputs.append(real_precompute(self, loaders))
        return outputs[-1]

    monkeypatch.setattr(PreferenceMethod, "_precompute", spy)
    _run(compose_cfg, tmp_path, "null")
    assert copies == [] and len(outputs) == 1
    _run(compose_cfg, tmp_path, "null", "trainer.max_steps=4", "ckpt_path=last")
    assert copies == [1] and len(outputs) == 2
    assert outputs[0].keys() == outputs[1].keys()
    for split in outputs[0]:
        assert torch.equal(outputs[0][split], outputs[1][split]), split
