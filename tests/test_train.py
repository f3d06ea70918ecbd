"""In-process training stages: precision, reference modes, what a stage returns."""

import csv
import json
import math

import pytest

from helpers import TINY
from ptlight.train import train_stage


def _metrics(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dpo_step_in_both_precisions(compose_cfg, tmp_path, precision):
    cfg = compose_cfg("method=dpo", f"trainer.precision={precision}", "eval.before=false", *TINY)
    report = train_stage(cfg, tmp_path)
    losses = _metrics(tmp_path)
    assert report["global_step"] == 3 and len(losses) == 3
    assert all(math.isfinite(v) for _, v in losses)
    assert losses[0][1] == pytest.approx(math.log(2), abs=1e-3 if precision == "32-true" else 2e-2)


def test_precomputed_reference_matches_the_frozen_copy(compose_cfg, tmp_path):
    runs = {}
    for mode in ("copy", "precompute"):
        cfg = compose_cfg("method=dpo", f"method.reference={mode}", "eval.before=false", *TINY)
        train_stage(cfg, tmp_path / mode)
        runs[mode] = _metrics(tmp_path / mode)
    assert [s for s, _ in runs["copy"]] == [s for s, _ in runs["precompute"]]
    for (_, a), (_, b) in zip(runs["copy"], runs["precompute"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_gradient_accumulation_and_clipping_come_from_trainer_config(compose_cfg, tmp_path):
    cfg = compose_cfg("method=sft", "trainer.accumulate_grad_batches=2",
                      "trainer.gradient_clip_val=0.5", "eval.before=false", *TINY)
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 3  # optimizer steps, each over 2 batches
    assert report["data"]["train_rows"] == 64


def test_resume_from_last_checkpoint_continues_the_step_count(compose_cfg, tmp_path):
    cfg = compose_cfg("method=dpo", "eval.before=false", *TINY)
    first = train_stage(cfg, tmp_path)
    assert first["global_step"] == 3 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    before = _metrics(tmp_path)
    resumed = train_stage(compose_cfg("method=dpo", "eval.before=false", *TINY,
                                      "trainer.max_steps=5", "ckpt_path=last"), tmp_path)
    assert resumed["global_step"] == 5
    after = _metrics(tmp_path)  # the resumed run appended the new steps to metrics.csv
    assert after[:3] == before and [s for s, _ in after] == [0, 1, 2, 3, 4]


def test_every_validation_writes_samples_and_a_gold_reward_point(compose_cfg, tmp_path):
    import json

    cfg = compose_cfg("method=sft", "eval.val_samples=3", *TINY)
    train_stage(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    at_step = [r for r in rows if r["when"] == "step 3"]
    assert len(at_step) == 3 and all(0.0 <= r["reward"] <= 1.0 for r in at_step)
    assert {r["when"] for r in rows} == {"before", "step 3", "after"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "val/gold/reward" in header


def test_a_stage_reports_its_win_rate_against_the_model_it_started_from(compose_cfg, tmp_path):
    cfg = compose_cfg("method=sft", "eval.before=true", "eval.val_samples=0", *TINY)
    report = train_stage(cfg, tmp_path)
    wins = report["win_rate_vs_start"]
    assert wins["num_prompts"] == cfg.eval.num_prompts
    assert wins["win_rate"] + wins["tie_rate"] + wins["loss_rate"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "eval.json").read_text())["win_rate_vs_start"] == wins
    cfg = compose_cfg("method=sft", "eval.before=false", "eval.val_samples=0", *TINY)
    assert "win_rate_vs_start" not in train_stage(cfg, tmp_path / "no_before")


def test_eval_num_prompts_zero_trains_and_exports_without_a_gold_evaluation(compose_cfg,
                                                                           tmp_path):
    cfg = compose_cfg("method=dpo", "eval.before=true", "eval.val_samples=0", *TINY,
                      "eval.num_prompts=0")
    report = train_stage(cfg, tmp_path)
    assert report["global_step"] == 3
    assert not {"before", "after", "win_rate_vs_start"} & set(report)
    assert (tmp_path / "export" / "config.json").is_file()
    assert "after" not in json.loads((tmp_path / "eval.json").read_text())
    cfg = compose_cfg("method=rm", "eval.num_pairs=0", *TINY)  # no held-out pair accuracy
    assert "heldout" not in train_stage(cfg, tmp_path / "rm")
