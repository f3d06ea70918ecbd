"""Product feedback -> training data (`python -m ptlight.feedback`) and acceptance as a metric
(ptlight/eval/acceptance.py, in training's eval.json and `python -m ptlight.eval`). Conversions run
in-process on hand-written logs; the CLI and the one tiny training run are marked slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import TINY
from ptlight.eval.acceptance import acceptance_summary, edit_distance, read_heldout
from ptlight.config import config_dir
from ptlight.errors import ConfigError, DataError
from ptlight.feedback import convert

P1 = [{"role": "user", "content": "Sort these words alphabetically: b a"}]
P2 = "Sort these words alphabetically: d c"


def _cfg(log_path, *overrides):
    overrides = [f"feedback.path={log_path}", *overrides]
    if GlobalHydra.instance().is_initialized():  # inside the compose_cfg fixture
        return compose("feedback", overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("feedback", overrides)


def _convert(tmp_path, events, *overrides):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    return convert(_cfg(log, *overrides), tmp_path / "out")


def _rows(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / "out" / name).read_text().splitlines()]


GOOD = [
    {"prompt": P1, "response": "a b", "rating": "up", "user": "u1", "timestamp": 1},
    {"prompt": P1, "response": "b a", "rating": "thumbs_down", "user": "u2", "timestamp": 2},
    {"prompt": P1, "response": "a", "rating": False, "user": "u2", "timestamp": 3},
    {"prompt": P2, "response": "c", "edited": "c d", "user": "u1", "timestamp": 4},
    {"prompt": P2, "responses": ["d c", "c d"], "choice": 1, "user": "u3", "timestamp": 5},
]


def test_edit_distance_is_normalised_levenshtein_on_words_or_characters():
    assert edit_distance("a b c", "a b c") == 0.0
    assert edit_distance("a b c", "a c") == pytest.approx(1 / 3)  # one deletion of three words
    assert edit_distance("a c", "a b c") == edit_distance("a b c", "a c")
    assert edit_distance("kitten", "sitting", unit="char") == pytest.approx(3 / 7)
    assert edit_distance("x y", "p q r") == 1.0 and edit_distance("", "") == 0.0
    assert edit_distance("a  b", "a b") == 0.0  # words: re-spacing is no edit


def test_acceptance_counts_scores_at_the_threshold_and_edit_distance_where_references_exist():
    out = acceptance_summary([1.0, 0.5, 0.99], ["a b", "a", "b a"], ["a b", "a b", None], 0.99)
    assert out["acceptance/rate"] == pytest.approx(2 / 3)
    assert out["acceptance/edit_distance"] == pytest.approx((0 + 0.5) / 2)
    assert out["acceptance/num_references"] == 2
    assert acceptance_summary([0.0], ["x"], [None], 1.0)["acceptance/edit_distance"] is None


def test_ratings_edits_and_choices_become_unpaired_and_pairwise_rows(tmp_path):
    report = _convert(tmp_path, GOOD, "feedback.listwise_min=2")
    pairs = _rows(tmp_path, "pairwise.jsonl")
    by_source = {r["source"]: r for r in pairs}
    assert by_source["edit"]["chosen"] == "c d" and by_source["edit"]["rejected"] == "c"
    assert by_source["choice"]["chosen"] == "c d" and by_source["choice"]["rejected"] == "d c"
    # a message-list prompt gets assistant-message completions; up > down from the ratings
    assert by_source["ratings"]["chosen"] == [{"role": "assistant", "content": "a b"}]
    kto = _rows(tmp_path, "unpaired.jsonl")
    assert [(r["completion"], r["label"]) for r in kto if r["source"] == "rating"] == [
        ([{"role": "assistant", "content": "a b"}], True),
        ([{"role": "assistant", "content": "b a"}], False),
        ([{"role": "assistant", "content": "a"}], False)]
    assert sum(r["source"] in ("edit", "choice") for r in kto) == 4  # both sides of each pair
    (listwise,) = _rows(tmp_path, "listwise.jsonl")
    assert listwise["scores"] == [1.0, 0.0, 0.0]
    assert report["events_by_source"] == {"rating": 3, "edit": 1, "choice": 1}
    assert report["balance"]["desirable"] == 3 and report["balance"]["undesirable"] == 4
    assert report["balance"]["suggested"] == {
        "desirable_weight": 1.333, "undesirable_weight": 1.0,
        "override": "method.objective.desirable_weight=1.333 "
                    "method.objective.undesirable_weight=1.0"}


def test_converted_files_are_read_by_the_data_module_as_kto_and_dpo_data(tmp_path, compose_cfg):
    from ptlight.model.backbone import load_tokenizer
    from ptlight.data.module import PtlDataModule

    varied = [{**e, "prompt": json.loads(json.dumps(e["prompt"]).replace("Sort", f"{i}. Sort"))}
              for i in range(4) for e in GOOD]  # 8 prompts: enough to split off validation
    _convert(tmp_path, varied)
    for kind, name in (("unpaired", "unpaired.jsonl"), ("pairwise", "pairwise.jsonl")):
        cfg = compose_cfg(f"data.path={tmp_path / 'out' / name}", "data.val_size=2",
                          "data.batch_size=2")
        dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), kind)
        dm.setup()
        assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] >= 2


BAD = {
    "no feedback": ({"prompt": P2, "response": "c d"}, "no feedback in this row"),
    "edit identical to the response": ({"prompt": P2, "response": "c d", "edited": "c d"},
                                       "identical to the response"),
    "unknown rating value": ({"prompt": P2, "response": "c d", "rating": "meh"},
                             "unknown rating value 'meh'"),
    "bad choice": ({"prompt": P2, "responses": ["c d", "d c"], "choice": 2},
                   "neither an index"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_a_bad_row_is_an_error_naming_it_or_a_counted_drop(tmp_path, reason):
    row, words = BAD[reason]
    events = GOOD[:3] + [row] + GOOD[3:]
    with pytest.raises(DataError, match=rf"log\.jsonl, row 3: .*{words}.*on_bad_row=drop"):
        _convert(tmp_path, events)
    report = _convert(tmp_path, events, "feedback.on_bad_row=drop")
    assert report["dropped"]["by_reason"] == {reason: 1} and report["dropped"]["rows"] == {
        reason: [3]}
    assert json.loads((tmp_path / "out" / "feedback.json").read_text())["dropped"]["count"] == 1


def test_contradictory_ratings_name_both_rows_and_drop_every_event_involved(tmp_path):
    events = GOOD + [{"prompt": P1, "response": "a b", "rating": "down", "user": "u9"}]
    with pytest.raises(DataError, match=r"rows 0, 5: contradictory ratings.*up at row\(s\) \[0\]"):
        _convert(tmp_path, events)
    report = _convert(tmp_path, events, "feedback.on_bad_row=drop")
    assert report["contradictions"] == 1
    assert report["dropped"]["by_reason"] == {"contradictory ratings": 2}
    assert all(r["completion"][0]["content"] != "a b" for r in _rows(tmp_path, "unpaired.jsonl")
               if r["source"] == "rating")


def test_a_log_that_is_all_one_label_is_refused_or_written_without_unpaired_rows(tmp_path):
    ups = [{"prompt": f"Sort these words alphabetically: {w} z", "response": f"{w} z",
            "rating": "up"} for w in "abc"]
    with pytest.raises(DataError, match="all 3 unpaired rows are desirable.*KTO needs both"):
        _convert(tmp_path, ups)
    with pytest.raises(DataError, match="no training rows"):  # nothing left to write
        _convert(tmp_path, ups, "feedback.on_bad_row=drop")
    report = _convert(tmp_path, ups + GOOD[3:4], "feedback.on_bad_row=drop",
                      "feedback.unpaired_from_pairs=false")
    assert report["dropped"]["by_reason"] == {"unpaired rows all one label": 3}
    assert report["written"]["unpaired.jsonl"] == 0 and report["written"]["pairwise.jsonl"] == 1
    assert not (tmp_path / "out" / "unpaired.jsonl").exists()  # none written, none left over


def test_small_edits_are_skipped_and_duplicates_counted(tmp_path):
    events = GOOD + [GOOD[0], {"prompt": P2, "response": "c d", "edited": "c  d"}]
    report = _convert(tmp_path, events)
    assert report["duplicates"] == 1 and report["duplicates_dropped"] == 1
    assert report["skipped"] == {"edit below feedback.min_edit=0.1": 1}
    assert _convert(tmp_path, events, "feedback.dedupe=false")["written"]["unpaired.jsonl"] == 8


def test_holdout_keeps_the_newest_prompts_out_of_training_with_their_references(tmp_path):
    later = [{"prompt": "Sort these words alphabetically: f e", "response": "e", "edited": "e f",
              "timestamp": "2026-11-02T00:00:00"},
             {"prompt": "Sort these words alphabetically: f e", "response": "e f",
              "rating": "up", "timestamp": "2026-11-03T00:00:00"}]
    report = _convert(tmp_path, later + GOOD, "feedback.holdout=0.3")  # 1 of 3 prompts
    assert report["heldout"] == {"prompts": 1, "events": 2}
    (held,) = _rows(tmp_path, "heldout.jsonl")
    assert held["reference"] == "e f" and held["logged_acceptance"] == 1.0
    trained = _rows(tmp_path, "unpaired.jsonl") + _rows(tmp_path, "pairwise.jsonl")
    assert all("f e" not in json.dumps(r["prompt"]) for r in trained)
    prompts, refs = read_heldout(str(tmp_path / "out" / "heldout.jsonl"), 10)
    assert prompts == [[{"role": "user", "content": "Sort these words alphabetically: f e"}]]
    assert refs == ["e f"]


def test_per_user_cap_skew_report_and_downsampling(tmp_path):
    many = [{"prompt": f"Sort these words alphabetically: {w} b", "response": f"b {w}",
             "rating": "down", "user": "loud"} for w in "cdefghijklmn"]
    others = [{**e, "user": f"v{i}"} for i, e in enumerate(GOOD)]
    report = _convert(tmp_path, many + others, "feedback.max_per_user=4",
                      "feedback.balance=downsample")
    users = report["users"]
    assert users["top_user"] == "loud" and users["top_user_share"] == pytest.approx(12 / 17)
    # 12 downs in a row at the log's down-rate (14 of 15 ratings) are no surprise
    assert users["over_share"] == ["loud"] and users["one_sided_raters"] == {}
    assert report["capped_per_user"] == 8
    kto = _rows(tmp_path, "unpaired.jsonl")
    assert sum(r["label"] for r in kto) == len(kto) / 2 and report["downsampled"] > 0
    assert any("loud" in w for w in report["warnings"])


def test_a_rater_whose_ratings_all_go_one_way_against_the_odds_is_flagged(tmp_path):
    def rating(i, user, up):
        return {"prompt": f"Sort these words alphabetically: w{i} b", "response": f"r{i}",
                "rating": "up" if up else "down", "user": user}

    fan = [rating(i, "fan", True) for i in range(20)]
    mixed = [rating(100 + i, f"v{i % 5}", i % 2 == 0) for i in range(40)]
    report = _convert(tmp_path, fan + mixed)  # up-rate 2/3: 20 ups in a row, p = 3e-4
    assert report["users"]["one_sided_raters"] == {"fan": "all 20 up"}
    assert any("'fan' rated all 20 up" in w for w in report["warnings"])


@pytest.mark.slow
def test_cli_bad_row_is_one_line_and_exit_2(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"prompt": P2, "response": "c d", "rating": "meh"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "ptlight.feedback", f"feedback.path={log}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1:] == [  # (datasets' progress bar above it)
        f"ptlight.feedback: error: {log}, row 0: unknown rating value 'meh'; up is one of "
        "['up', 'thumbs_up', '+1', '1', 'true', 'positive', 'good', 'like', 'accept', "
        "'accepted'], down one of ['down', 'thumbs_down', '-1', '0', 'false', 'negative', "
        "'bad', 'dislike', 'reject', 'rejected'] (feedback.ratings.up/down add values). Fix "
        "the log, or set feedback.on_bad_row=drop to drop such rows (they are counted in "
        "feedback.json)."]


@pytest.mark.slow
def test_acceptance_reaches_the_training_report_and_the_eval_app(tmp_path):
    """One tiny SFT run: eval.json holds acceptance before/after; ptlight.eval on feedback
    held-out prompts reports acceptance, edit distance and the win rate vs a baseline."""
    from ptlight.eval.app import run_eval
    from ptlight.train import train_stage

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        report = train_stage(compose("config", ["method=sft", *TINY]), tmp_path / "sft")
        for when in ("before", "after"):
            assert 0 <= report[when]["acceptance/rate"] <= report[when]["gold/exact"] + 1e-9
            assert report[when]["acceptance/num_references"] == 8  # sort has reference answers
        assert "| acceptance | edit distance to reference |" in (
            tmp_path / "sft" / "report.md").read_text()
        held = tmp_path / "heldout.jsonl"
        held.write_text(json.dumps({"prompt": P1, "reference": "a b"}) + "\n"
                        + json.dumps({"prompt": P2}) + "\n")
        export = report["export_dir"]
        cfg = compose("config", [*TINY, f"model.path={export}", f"eval.baseline={export}",
                                 f"eval.acceptance.path={held}", "eval.num_pairs=0",
                                 "eval.acceptance.threshold=0.5"])
        result = run_eval(cfg, tmp_path / "eval")
        # no task: a reward plugin judges acceptance and the win rate on the file's prompts
        judged = run_eval(compose("config", [
            *TINY, f"model.path={export}", f"eval.baseline={export}", "data.task=null",
            f"eval.acceptance.path={held}", "eval.num_pairs=0",
            "eval.acceptance.judge={name: gold, task: sort}"]), tmp_path / "judged")
    m, j = result["acceptance"]["model"], judged["acceptance"]["model"]
    assert j["acceptance/edit_distance"] == m["acceptance/edit_distance"]  # same generations
    assert j["acceptance/rate"] <= m["acceptance/rate"]  # under threshold 1.0 instead of 0.5
    assert "gold" not in judged and judged["acceptance"]["win_rate"]["tie_rate"] == 1.0
    acc = result["acceptance"]
    assert acc["model"]["acceptance/num_prompts"] == 2
    assert acc["model"]["acceptance/num_references"] == 1
    assert acc["model"] == acc["baseline"]  # the same model as its own baseline
    assert acc["win_rate"]["tie_rate"] == 1.0 and acc["judge"] == "gold (sort)"
    assert "model acceptance rate" in (tmp_path / "eval" / "report.md").read_text()
    assert "acceptance/rate" in result["gold"]


@pytest.mark.parametrize("override,message", [
    ("feedback.pairs_from_ratings=no", r"feedback\.pairs_from_ratings='no': whether up- and "
                                       r"down-rated responses to one prompt give pairs; write "
                                       r"feedback\.pairs_from_ratings=true or "
                                       r"feedback\.pairs_from_ratings=false \(unquoted\)"),
    ("feedback.unpaired_from_pairs=off", r"feedback\.unpaired_from_pairs='off'"),
    ("feedback.dedupe=maybe", r"feedback\.dedupe='maybe'"),
    ("feedback.min_edit=2", r"feedback\.min_edit=2: the normalised edit distance from which an "
                            r"edit is a preference must be a finite number >= 0\.0 and <= 1\.0"),
    ("feedback.skew_warn=-1", r"feedback\.skew_warn=-1: the share of events one user may hold"),
    ("feedback.listwise_min=1", r"feedback\.listwise_min=1: distinct rated responses a prompt "
                                r"needs for a listwise row; write a whole number >= 2"),
])
def test_switches_and_thresholds_out_of_range_are_refused_before_the_log_is_read(
        tmp_path, override, message):
    """A string "no" is truthy: pairs_from_ratings=no turned the pairs on."""
    with pytest.raises(ConfigError, match=message):
        _convert(tmp_path, GOOD, override)
    assert not (tmp_path / "out").exists()
