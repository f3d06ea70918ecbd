"""Run outputs for people: report.md + plots, samples.jsonl, model card, the pipeline and sweep
reports, the `python -m ptlight.eval` app (gold metric, win rate, preference accuracy), and the
wandb samples table. In-process runs use the tiny model; CLI runs are marked slow."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from helpers import TINY, run_cli
from ptlight.config import config_dir
from ptlight.eval.gold import (SAMPLE_COLUMNS, Sample, gold_samples, preference_accuracy,
                              win_rate)
from ptlight.report import read_metrics, sweep_report, write_pipeline_report
from ptlight.tasks import resolve_task
from ptlight.train import train_stage

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, path  # a real picture, not a stub
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """In-process SFT (fresh tiny model) then DPO from its export, as the pipeline runs them."""
    root = tmp_path_factory.mktemp("runs")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        sft = train_stage(compose("config", ["method=sft", *TINY]), root / "0-sft")
        dpo_cfg = compose("config", ["method=dpo", f"model.path={sft['export_dir']}", *TINY])
        dpo = train_stage(dpo_cfg, root / "1-dpo")
    return root, sft, dpo


def test_read_metrics_keeps_each_column_where_it_was_logged(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,0,0.9,\n0,1,0.7,\n0,1,,0.8\n1,2,0.5,\n")
    series = read_metrics(tmp_path / "metrics.csv")
    assert series == {"train/loss": [(0, 0.9), (1, 0.7), (2, 0.5)], "val/loss": [(1, 0.8)]}


@pytest.mark.parametrize("stage,preference", [("0-sft", False), ("1-dpo", True)])
def test_every_run_dir_gets_a_report_and_plots(runs, stage, preference):
    run_dir = runs[0] / stage
    report = (run_dir / "report.md").read_text()
    for png in ("loss.png", "gold.png"):
        _png(run_dir / png)
        assert f"]({png})" in report
    assert (run_dir / "rewards.png").is_file() == preference
    assert ("](rewards.png)" in report) == preference
    steps = {int(r["step"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))}
    assert len(steps) == 3 and "| steps | 3 (batch 8 per device" in report
    assert "## Gold metric (8 held-out `sort` prompts, greedy)" in report


def test_samples_jsonl_holds_the_gold_generations_before_and_after(runs):
    root, sft, _ = runs
    lines = (root / "0-sft" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows and all(tuple(r) == SAMPLE_COLUMNS for r in rows)
    assert {r["stage"] for r in rows} == {"sft"}
    for when in ("before", "after"):
        rewards = [r["reward"] for r in rows if r["when"] == when]
        assert len(rewards) == 8  # eval.num_prompts=8 < eval.num_samples: every generation
        assert sum(rewards) / 8 == pytest.approx(sft[when]["gold/reward"])
    assert all(r["prompt"].startswith("Sort these words") for r in rows)


def test_model_card_names_base_tags_and_hyperparameters(runs):
    root, sft, dpo = runs
    card = (root / "1-dpo" / "export" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["base_model"] == sft["export_dir"]
    assert front["tags"] == ["ptlight", "preference", "dpo"]
    assert "| beta | 0.1 |" in card and "| rpo_alpha | 0.0 |" in card
    assert f"| after training | {dpo['after']['gold/reward']:.3f} |" in card
    assert "val/rewards/accuracies" in card
    sft_card = (root / "0-sft" / "export" / "README.md").read_text()
    sft_front = yaml.safe_load(sft_card.split("---\n")[1])
    assert "base_model" not in sft_front and sft_front["tags"] == ["ptlight", "sft"]


def test_pipeline_report_links_stages_and_charts_them(runs):
    root, sft, dpo = runs
    write_pipeline_report(root, [{"stage": "sft", **sft}, {"stage": "dpo", **dpo}])
    report = (root / "report.md").read_text()
    assert "[0-sft](0-sft/report.md)" in report and "[1-dpo](1-dpo/report.md)" in report
    assert "| start (before sft) |" in report and "| after dpo |" in report
    _png(root / "gold.png")


def test_win_rate_counts_wins_ties_and_losses():
    model = [Sample("p1", "a", 1.0), Sample("p2", "b", 0.5), Sample("p3", "c", 0.0),
             Sample("p4", "d", 0.2)]
    base = [Sample("p1", "x", 0.5), Sample("p2", "y", 0.5), Sample("p3", "z", 1.0),
            Sample("p4", "w", 0.0)]
    assert win_rate(model, base) == {"win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25,
                                     "num_prompts": 4}
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(model, base[::-1])


def _pairs(runs):
    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.data.module import PtlDataModule

    cfg = OmegaConf.load(runs[0] / "1-dpo" / "config.yaml")
    tok = load_tokenizer(cfg.model)
    model = build_policy(OmegaConf.merge(cfg.model, {"path": runs[2]["export_dir"]}), tok)
    dm = PtlDataModule(cfg.data, tok, "pairwise")
    dm.setup()
    return model, list(dm.val_dataloader())


def _swap(batch):
    """Rejected block first: the same pairs with chosen and rejected exchanged (the rows'
    completion index rebuilt for the new order)."""
    from ptlight.engine.logps import completion_index

    rows = ("input_ids", "attention_mask", "loss_mask")
    swapped = {k: batch[k].view(2, -1, *batch[k].shape[1:]).flip(0).reshape(batch[k].shape)
               for k in rows}
    return {**batch, **swapped, "completion_index": completion_index(swapped["loss_mask"])}


def test_preference_accuracy_is_the_sign_of_the_implicit_margin(runs):
    model, batches = _pairs(runs)
    plain = preference_accuracy(model, batches, total=len(batches))
    swapped = preference_accuracy(model, [_swap(b) for b in batches], total=len(batches))
    assert plain["num_pairs"] == 8 and plain["score"] == "summed log-probs"
    assert swapped["accuracy"] == pytest.approx(1 - plain["accuracy"])  # no exact ties
    assert swapped["mean_margin"] == pytest.approx(-plain["mean_margin"], rel=1e-4, abs=1e-5)
    against_self = preference_accuracy(model, batches, total=len(batches), reference=model)
    assert against_self["accuracy"] == 0.0 and against_self["mean_margin"] == 0.0  # ties lose


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(runs):
    from ptlight.model.backbone import build_policy, load_tokenizer

    cfg = OmegaConf.load(runs[0] / "0-sft" / "config.yaml")
    cfg.model.path = runs[1]["export_dir"]
    tok = load_tokenizer(cfg.model)
    model = build_policy(cfg.model, tok)
    cfg.eval.do_sample, cfg.eval.temperature = True, 2.0
    state = torch.random.get_rng_state()
    first = gold_samples(model, tok, resolve_task("sort"), cfg.eval)
    assert torch.equal(state, torch.random.get_rng_state())
    assert [s.completion for s in gold_samples(model, tok, resolve_task("sort"), cfg.eval)] == \
        [s.completion for s in first]
    cfg.eval.do_sample = False
    greedy = gold_samples(model, tok, resolve_task("sort"), cfg.eval)
    assert [s.completion for s in greedy] != [s.completion for s in first]


def _fake_job(sweep, num, overrides, report):
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if report is not None:
        (sweep / str(num) / "eval.json").write_text(json.dumps(report))


def test_sweep_table_labels_jobs_by_what_differs(tmp_path):
    def job(gold, acc):
        return {"after": {"gold/reward": gold, "gold/exact": gold / 2}, "global_step": 5,
                "wall_time_s": 12.3,
                "final_metrics": {"val/loss": 0.5, "val/rewards/accuracies": acc,
                                  "train/loss": 0.25}}
    _fake_job(tmp_path, 0, ["method=dpo", "method.objective.beta=0.05"], job(0.4, 0.7))
    _fake_job(tmp_path, 1, ["method=dpo", "method.objective.beta=0.1"], job(0.6, 0.8))
    _fake_job(tmp_path, 10, ["method=dpo", "method.objective.beta=0.5"], None)  # failed
    lines = sweep_report(tmp_path).read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == ("| job | overrides | gold reward | exact match | val loss | "
                        "val reward acc. | train loss | steps | wall s | missing |")
    assert table[1] == ("| 0 | method.objective.beta=0.05 | 0.400 | 0.200 | 0.500 | 0.700 | "
                        "0.250 | 5 | 12 |  |")
    assert table[3].startswith("| 10 | method.objective.beta=0.5 | – |")
    assert table[3].endswith("| failed: no eval.json (the job stopped before it finished; see "
                             "its log) |")
    assert len(table) == 4
    _png(tmp_path / "gold.png")


def test_sweep_table_of_short_runs_shows_train_metrics_and_says_what_is_missing(tmp_path):
    """Runs too short to validate, on data without a task: the train columns are there, and
    the `missing` column says why gold and val/ are not."""
    for i, lr in enumerate((1e-4, 1e-3)):
        _fake_job(tmp_path, i, ["method=dpo", f"method.optim.lr={lr}"],
                  {"global_step": 20, "wall_time_s": 9.0,
                   "final_metrics": {"train/loss": 0.6 - i / 10, "train/rewards/accuracies": 0.5}})
        (tmp_path / str(i) / "config.yaml").write_text(yaml.safe_dump(
            {"data": {"task": None}, "trainer": {"max_steps": 20, "val_check_interval": 50}}))
    table = [line for line in sweep_report(tmp_path).read_text().splitlines()
             if line.startswith("| ")]
    assert table[0] == ("| job | overrides | train loss | train reward acc. | steps | wall s | "
                        "missing |")
    assert table[2] == ("| 1 | method.optim.lr=0.001 | 0.500 | 0.500 | 20 | 9 | no gold metric: "
                        "no task (set data.task to a task name or a task file); no val/ metrics:"
                        " trainer.max_steps=20 < trainer.val_check_interval=50 |")


def test_sweep_table_of_eval_jobs_shows_only_what_they_measured(tmp_path):
    for i, (win, acc) in enumerate([(0.25, 0.6), (0.5, 0.9)]):
        _fake_job(tmp_path, i, [f"model.path=m{i}", "eval.baseline=b"],
                  {"gold": {"gold/reward": 0.5, "gold/exact": 0.25},
                   "win_rate": {"win_rate": win}, "preference": {"accuracy": acc}})
    table = [line for line in sweep_report(tmp_path).read_text().splitlines()
             if line.startswith("| ")]
    assert table[0] == "| job | overrides | gold reward | exact match | win rate | pref. accuracy |"
    assert table[2] == "| 1 | model.path=m1 | 0.500 | 0.250 | 0.500 | 0.900 |"


# ---- CLI ---------------------------------------------------------------------------------
def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _module(name, *args, env=None):
    return subprocess.run([sys.executable, "-m", name, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


EVAL_TINY = ["eval.num_prompts=8", "eval.max_new_tokens=8", "eval.num_pairs=16",
             "eval.batch_size=8"]


@pytest.mark.slow
def test_eval_app_gold_win_rate_and_preference_accuracy(runs, tmp_path):
    sft_export, dpo_export = runs[1]["export_dir"], runs[2]["export_dir"]
    proc = _ok(_module("ptlight.eval", f"model.path={dpo_export}", f"eval.baseline={dpo_export}",
                       f"eval.reference={sft_export}", f"hydra.run.dir={tmp_path}", *EVAL_TINY))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["gold"]["gold/reward"] == pytest.approx(runs[2]["after"]["gold/reward"])
    assert result["baseline"]["gold/reward"] == result["gold"]["gold/reward"]
    assert result["win_rate"] == {"win_rate": 0.0, "tie_rate": 1.0, "loss_rate": 0.0,
                                  "num_prompts": 8}  # the same model as its own baseline
    pref = result["preference"]
    assert pref["num_pairs"] == 16 and 0.0 <= pref["accuracy"] <= 1.0
    assert pref["score"] == "log-ratio vs reference" and pref["reference"] == sft_export
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["when"] for r in rows] == ["model"] * 8 + ["baseline"] * 8
    assert all(set(r) == set(SAMPLE_COLUMNS) for r in rows)
    assert "| win rate vs baseline | 0.000 |" in (tmp_path / "report.md").read_text()
    _png(tmp_path / "gold.png")
    assert "preference accuracy" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("override", ["model.path=/no/such/model", "data.task=nope"])
def test_eval_app_bad_model_or_task_is_one_line_and_exit_2(tmp_path, override):
    proc = _module("ptlight.eval", override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("ptlight.eval: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and override.split("=")[0] in proc.stderr


@pytest.mark.slow
def test_report_cli_on_a_training_multirun(tmp_path):
    _ok(run_cli("-m", "method=sft", "seed=0,1", "eval.before=false", f"hydra.sweep.dir={tmp_path}",
                *TINY))
    proc = _ok(_module("ptlight.report", str(tmp_path)))
    table = [line for line in (tmp_path / "report.md").read_text().splitlines()
             if line.startswith("| ")]
    assert [row.split(" | ")[:2] for row in table[1:]] == [["| 0", "seed=0"], ["| 1", "seed=1"]]
    assert "| gold reward |" in table[0] and "| val loss |" in table[0]
    assert "| 1 | seed=1 |" in proc.stdout
    _png(tmp_path / "gold.png")
    assert _module("ptlight.report", str(tmp_path / "nope")).returncode == 2


@pytest.mark.slow
def test_wandb_offline_run_holds_the_samples_table(tmp_path):
    _ok(run_cli("method=sft", "logger=wandb", f"hydra.run.dir={tmp_path}", *TINY,
                env={"WANDB_MODE": "offline"}))
    tables = list((tmp_path / "wandb").glob(
        "offline-run-*/files/media/table/gold/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    # 8 prompts before and after, plus eval.val_samples (8) at the one validation (step 3)
    assert table["columns"] == list(SAMPLE_COLUMNS) and len(table["data"]) == 24
    assert {row[1] for row in table["data"]} == {"before", "step 3", "after"}
