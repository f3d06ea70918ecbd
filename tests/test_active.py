"""Active sampling (ptlight/data/active.py): priorities are the policy's predictive entropy (or
an ensemble's disagreement), draws follow softmax(z / T), every refresh is logged, and the
sampler plugs into preference and PPO training through ``+data/sampler=active``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, run_cli, tiny_model_cfg
from omegaconf import OmegaConf

from ptlight.data.active import (ActiveSampler, check_settings, sample_with_logps,
                                 softmax_weights, user_turn)
from ptlight.errors import ConfigError

SETTINGS = dict(name="active", score="entropy", num_samples=2, sample_temperature=1.0,
                max_new_tokens=6, pool_size=16, refresh_every=1, temperature=1.0, batch_size=8,
                ensemble=[])


def _settings(**kw):
    return OmegaConf.create({**SETTINGS, **kw})


def test_weights_are_softmax_of_standardised_priorities():
    p = torch.tensor([1.0, 2.0, 3.0])
    z = (p - p.mean()) / p.std()
    torch.testing.assert_close(softmax_weights(p, 0.5), torch.softmax(z / 0.5, 0))
    torch.testing.assert_close(softmax_weights(p * 100 + 7, 0.5), softmax_weights(p, 0.5))
    torch.testing.assert_close(softmax_weights(torch.full((4,), 3.0), 1.0), torch.full((4,), 0.25))
    cold, hot = softmax_weights(p, 0.1), softmax_weights(p, 100.0)
    assert cold[2] > 0.99 and (hot - 1 / 3).abs().max() < 0.01


@pytest.mark.parametrize("change, match", [
    ({"name": "thompson"}, "data.sampler.name"),
    ({"score": "variance"}, "data.sampler.score"),
    ({"pool_size": 0}, "data.sampler.pool_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"score": "ensemble", "ensemble": [{"name": "gold"}]}, "at least 2 reward specs"),
])
def test_settings_mistakes_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        check_settings(_settings(**change))


@pytest.fixture(scope="module")
def policy_and_tok():
    from ptlight.model.backbone import build_policy, load_tokenizer

    tok = load_tokenizer(tiny_model_cfg())
    torch.manual_seed(0)
    return build_policy(tiny_model_cfg(), tok), tok


def test_sampled_log_probs_match_a_forward_pass(policy_and_tok):
    """Ĥ(x) uses generate's own logits; they must equal log π(y|x) scored afterwards."""
    from ptlight.engine.logps import completion_logps
    from ptlight.data.module import pad_rows

    policy, tok = policy_and_tok
    prompts = [tok("Sort these words alphabetically: kiwi fig").input_ids,
               tok("Sort: a").input_ids]
    torch.manual_seed(1)
    groups, sums = sample_with_logps(policy, prompts, tok.pad_token_id, tok.eos_token_id,
                                     num_samples=3, max_new_tokens=5, temperature=1.0,
                                     batch_size=8)
    assert sums.shape == (2, 3) and [len(g) for g in groups] == [3, 3]
    seqs = [(p, c) for p, g in zip(prompts, groups) for c in g]
    batch = pad_rows(seqs, tok.pad_token_id)
    with torch.no_grad():
        expected = completion_logps(policy, batch["input_ids"], batch["attention_mask"],
                                    batch["loss_mask"]).sequence_sum().view(2, 3)
    torch.testing.assert_close(sums, expected, atol=1e-3, rtol=1e-4)


def _fake_dm(policy, tok, n: int, tmp_path, batch_size: int = 4):
    from ptlight.data.module import Item
    from ptlight.data.tokenize import Encoded

    def ids(text):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
        return tok(rendered, add_special_tokens=False).input_ids

    items = [Item(Encoded(prompt=ids(f"Sort these words alphabetically: w{i}"), completions=[],
                          truncated=False)) for i in range(n)]
    trainer = SimpleNamespace(lightning_module=SimpleNamespace(policy=policy), global_step=7,
                              is_global_zero=True, loggers=[], default_root_dir=str(tmp_path),
                              world_size=1)
    return SimpleNamespace(train=items, tokenizer=tok, trainer=trainer,
                           cfg=OmegaConf.create({"seed": 0, "batch_size": batch_size}))


def test_an_epoch_draws_each_pool_by_priority_and_logs_it(policy_and_tok, tmp_path, monkeypatch):
    policy, tok = policy_and_tok
    dm = _fake_dm(policy, tok, 40, tmp_path)
    sampler = ActiveSampler(dm, _settings(pool_size=16, refresh_every=1, temperature=0.05))
    # priority = the example's index: the coldest softmax picks the top of each pool
    monkeypatch.setattr(sampler, "priorities", lambda idx: torch.tensor(idx, dtype=torch.float))
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 40
    log = [json.loads(x) for x in (tmp_path / "sampler.jsonl").read_text().splitlines()]
    assert len(log) == 10 and sampler.refreshes == 10  # one pool per batch of 4
    for k, entry in enumerate(log):
        pool = entry["index"]
        got = drawn[4 * k : 4 * k + 4]
        assert sorted(got) == sorted(pool)[-4:]  # the 4 highest priorities of the pool
        assert [entry["drawn"][pool.index(i)] for i in got] == [True] * 4
        assert entry["sampler/priority_selected"] >= entry["sampler/priority_mean"]
        assert entry["step"] == 7 and entry["sampler/entropy"] < entry["max_entropy"]


def test_hot_sampling_is_close_to_uniform(policy_and_tok, tmp_path, monkeypatch):
    policy, tok = policy_and_tok
    dm = _fake_dm(policy, tok, 400, tmp_path, batch_size=100)
    sampler = ActiveSampler(dm, _settings(pool_size=200, refresh_every=1, temperature=1000.0))
    monkeypatch.setattr(sampler, "priorities", lambda idx: torch.tensor(idx, dtype=torch.float))
    drawn = list(sampler)
    # pools are drawn independently, so a uniform draw reaches ~1 - 0.75^4 = 68% of the examples
    assert len(set(drawn)) > 240
    assert abs(sum(drawn) / len(drawn) - 199.5) < 25


def test_entropy_priorities_come_from_the_policy(policy_and_tok, tmp_path):
    policy, tok = policy_and_tok
    dm = _fake_dm(policy, tok, 6, tmp_path)
    sampler = ActiveSampler(dm, _settings(num_samples=3))
    torch.manual_seed(0)
    prios = sampler.priorities([0, 1, 2])
    assert prios.shape == (3,) and (prios > 0).all()  # -mean log-prob of sampled text


def test_ensemble_priority_is_the_std_of_the_members_rewards(policy_and_tok, tmp_path,
                                                             monkeypatch):
    import ptlight.rewards as rewards
    from ptlight.rewards import Reward

    seen = []

    class Const(Reward):
        name = "const"

        def __init__(self, value):
            self.value = value

        def score(self, prompts, completions):
            seen.extend(prompts)
            return [self.value * (1 + len(p[0]["content"]) % 2) for p in prompts]

    members = iter([Const(0.0), Const(2.0)])
    monkeypatch.setattr(rewards, "build_reward", lambda spec, key: next(members))
    policy, tok = policy_and_tok
    dm = _fake_dm(policy, tok, 4, tmp_path)
    sampler = ActiveSampler(dm, _settings(score="ensemble", ensemble=[{"name": "a"}, {"name": "b"}]))
    prios = sampler.priorities([0, 1])
    # members give 0 and 2*(1 + len % 2): std over two members = |difference| / sqrt(2)
    lens = [len(f"Sort these words alphabetically: w{i}") % 2 for i in (0, 1)]
    torch.testing.assert_close(prios, torch.tensor([2.0 * (1 + x) / math.sqrt(2) for x in lens]))
    assert seen[0] == [{"role": "user", "content": "Sort these words alphabetically: w0"}]


def test_user_turn_recovers_the_user_text_of_a_rendered_prompt(policy_and_tok):
    _, tok = policy_and_tok
    rendered = tok.apply_chat_template([{"role": "user", "content": "How do I fix a bike?"}],
                                       add_generation_prompt=True, tokenize=False)
    assert user_turn(tok, rendered) == "How do I fix a bike?"
    assert user_turn(tok, "plain text") == "plain text"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_active_sampling_trains_preference_and_ppo_and_logs_priorities(tmp_path, method):
    overrides = [*TINY, f"method={method}", "+data/sampler=active", "data.sampler.pool_size=16",
                 "data.sampler.max_new_tokens=4", "data.sampler.refresh_every=1",
                 f"hydra.run.dir={tmp_path}", "eval.before=false"]
    if method == "ppo":
        overrides += ["method.ppo.max_new_tokens=4", "method.ppo.num_ppo_epochs=1",
                      "trainer.max_steps=4"]
    proc = run_cli(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "sampler.jsonl").read_text().splitlines()]
    assert log and all(len(e["index"]) == 16 and sum(e["drawn"]) == 8 for e in log)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "sampler/priority_mean" in header and "sampler/entropy" in header
