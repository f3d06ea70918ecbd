"""Every row of the "Bad input: what you see" table (docs/reliability.md), tried. Each case checks the one
message the CLI prints (``ptlight: error: <message>``, exit status 2; Hydra's own message for
an unknown config group option) and that it names the file and row, or the key to change."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
from hydra.errors import MissingConfigException

from helpers import REPO, TINY, run_cli
from ptlight.model.backbone import BUNDLED_TOKENIZER
from ptlight.errors import ConfigError, DataError, ModelLoadError, PluginError
from ptlight import registry
from ptlight.train import train_stage

U = [{"role": "user", "content": "Sort these words alphabetically: kiwi apple"}]
A = [{"role": "assistant", "content": "apple kiwi"}]
B = [{"role": "assistant", "content": "kiwi apple"}]
GOOD_SFT = {"prompt": U, "completion": A}
GOOD_PAIR = {"prompt": U, "chosen": A, "rejected": B}


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _stage(compose_cfg, tmp_path, method, *overrides):
    """train_stage on the overrides; weights must never load for a bad input."""
    cfg = compose_cfg(f"method={method}", "eval.before=false", *TINY, *overrides)
    return train_stage(cfg, tmp_path / "run")


def _with(rows, at, row):
    rows = list(rows)
    rows[at] = row
    return rows


DATA_CASES = {
    "missing column": ("sft", _with([GOOD_SFT] * 20, 4, {"prompt": U, "answer": A}),
                       r"data\.jsonl, row 4: missing column 'completion' \(this row has "
                       r"\['answer', 'prompt'\]\)\. Fix the row, or set data\.on_bad_row=drop"),
    "misnamed column": ("dpo", [{"prompt": U, "chosen": A, "reject": B}] * 20,
                        r"data\.jsonl, row 0: pairwise data needs 'chosen' and 'rejected' "
                        r"columns; found \['chosen', 'prompt', 'reject'\]"),
    "wrong type": ("sft", _with([GOOD_SFT] * 20, 5, {"prompt": U, "completion": 3}),
                   r"data\.jsonl, row 5: column 'completion' must be a string or a list of "
                   r"\{'role', 'content'\} messages, got int"),
    "wrong label type": ("kto", _with([{**GOOD_SFT, "label": True}] * 20, 2,
                                      {**GOOD_SFT, "label": "yes"}),
                         r"data\.jsonl, row 2: column 'label' must be a boolean"),
    "empty string": ("sft", _with([{"prompt": "Q:", "completion": " a"}] * 20, 3,
                                  {"prompt": "Q:", "completion": "  "}),
                     r"data\.jsonl, row 3: column 'completion' is an empty string"),
    "chosen == rejected": ("dpo", _with([GOOD_PAIR] * 20, 2, {"prompt": U, "chosen": A,
                                                              "rejected": A}),
                           r"data\.jsonl, row 2: chosen == rejected \(the pair carries no "
                           r"preference\)"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_rows_name_file_row_and_reason(compose_cfg, tmp_path, no_weights, case):
    method, rows, message = DATA_CASES[case]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        _stage(compose_cfg, tmp_path, method, f"data.path={path}", f"data.val_path={path}",
               "data.task=null")


@pytest.mark.parametrize("tail,message", [
    (b'{"prompt": "caf\xe9", "completion": "x"}\n',
     r"data\.jsonl, line 21: not valid UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8"),
    (b'{"prompt": "a", "compl',
     r"data\.jsonl, line 21: not valid JSON \(Unterminated string starting at, column 17\) "
     r"\(the file looks truncated\)"),
])
def test_non_utf8_or_truncated_jsonl_names_the_line(compose_cfg, tmp_path, no_weights, tail,
                                                    message):
    path = _jsonl(tmp_path, [{"prompt": "Q:", "completion": " a"}] * 20)
    path.write_bytes(path.read_bytes() + tail)
    with pytest.raises(DataError, match=message):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={path}", "data.task=null")


def test_missing_data_file(compose_cfg, tmp_path, no_weights):
    with pytest.raises(DataError, match=r"'nope\.jsonl': no such file or directory"):
        _stage(compose_cfg, tmp_path, "sft", "data.path=nope.jsonl", "data.task=null")


def test_prompt_longer_than_max_length(compose_cfg, tmp_path, monkeypatch):
    long = [{"role": "user", "content": "apple " * 60}]
    path = _jsonl(tmp_path, [{"prompt": long, "completion": A}] * 20)
    args = (f"data.path={path}", "data.task=null", "data.max_length=32")
    with monkeypatch.context() as m:
        import ptlight.train

        m.setattr(ptlight.train, "build_policy", lambda *a: pytest.fail("weights loaded"))
        with pytest.raises(DataError, match=r"data\.jsonl, row 0: prompt \(\d+ tokens\) \+ "
                           r"completion \(\d+ tokens\) exceeds data\.max_length=32 "
                           r"\(data\.truncation=error\)"):
            _stage(compose_cfg, tmp_path, "sft", *args, "data.truncation=error")
    report = _stage(compose_cfg, tmp_path, "sft", *args)  # keep_end (default): cut and counted
    assert report["data"]["truncated"] == report["data"]["train_rows"] + report["data"]["val_rows"]


def test_data_set_empty_after_filtering(compose_cfg, tmp_path, no_weights):
    path = _jsonl(tmp_path, [{"prompt": U, "chosen": A, "rejected": A}] * 20)
    with pytest.raises(DataError, match=r"data\.jsonl: no usable rows \(18 dropped: 18x chosen "
                       r"== rejected"):
        _stage(compose_cfg, tmp_path, "dpo", f"data.path={path}", "data.task=null",
               "data.on_bad_row=drop")


@pytest.fixture
def no_template_tokenizer(tmp_path):
    target = tmp_path / "tok"
    shutil.copytree(BUNDLED_TOKENIZER, target)
    (target / "chat_template.jinja").unlink()
    return target


def test_tokenizer_without_chat_template(compose_cfg, tmp_path, no_weights,
                                         no_template_tokenizer):
    tok = f"model.tokenizer={no_template_tokenizer}"
    with pytest.raises(ConfigError, match=r"data\.task='sort' writes its prompts as chat "
                       r"messages, but the tokenizer '.*tok' has no chat template"):
        _stage(compose_cfg, tmp_path, "sft", tok)
    path = _jsonl(tmp_path, [GOOD_SFT] * 20)
    with pytest.raises(DataError, match=r"data\.jsonl, row \d+: message lists are rendered with "
                       r"the tokenizer's chat template, but the tokenizer '.*tok' has none"):
        _stage(compose_cfg, tmp_path, "sft", tok, f"data.path={path}", "data.task=null")


def test_tokenizer_without_chat_template_is_fine_for_plain_text(compose_cfg, tmp_path,
                                                                no_template_tokenizer):
    from omegaconf import OmegaConf

    from ptlight.model.backbone import load_tokenizer
    from ptlight.data.module import PtlDataModule

    path = _jsonl(tmp_path, [{"prompt": "Q:", "completion": " a"}] * 20)
    cfg = compose_cfg("method=sft", f"model.tokenizer={no_template_tokenizer}",
                      f"data.path={path}", "data.task=null")
    dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), "sft")
    dm.setup()
    assert dm.report()["train_rows"] == 18


def test_misspelt_key_is_refused_by_hydra(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override "
                       r"'trainer\.max_step'"):
        compose_cfg("method=sft", "trainer.max_step=5")


@pytest.mark.parametrize("override,listed", [
    ("method=nope", ["dpo", "sft", "kto"]),
    ("model=nope", ["lfm2", "lfm2-tiny"]),
    ("trainer=nope", ["default"]),
])
def test_unknown_config_names_list_what_exists(compose_cfg, override, listed):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(override)
    message = str(err.value)
    assert f"Could not find '{override.split('=')[0]}/nope'" in message
    assert all(f"\t{name}\n" in message + "\n" for name in listed)


@pytest.mark.parametrize("override,exc,message", [
    ("method.objective.name=nope", ConfigError,
     r"method\.objective\.name: unknown objective 'nope'; installed objectives: .*dpo.*sft"),
    ("method.module=nope", ConfigError,
     r"method\.module='nope' is unknown; available: .*preference.*sft"),
    ("data.task=nope", ConfigError, r"data\.task='nope' is unknown; installed tasks: .*safety, sort"),
    ("+method.objective.betta=1", ConfigError,
     r"no hyperparameter\(s\) method\.objective\.betta; valid keys: beta"),
])
def test_unknown_names_in_keys_list_what_exists(compose_cfg, tmp_path, no_weights, override,
                                                exc, message):
    with pytest.raises(exc, match=message):
        _stage(compose_cfg, tmp_path, "dpo", override)


def test_optimizer_offload_to_a_missing_directory(compose_cfg, tmp_path, no_weights):
    with pytest.raises(ConfigError, match=r"optimizer_offload='.*missing' is not a directory: "
                                          r"create it, or set optimizer_offload=null"):
        _stage(compose_cfg, tmp_path, "dpo", f"optimizer_offload={tmp_path / 'missing'}")


def test_model_path_that_is_not_a_model_dir(compose_cfg, tmp_path, no_weights):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    cases = {
        tmp_path / "notes": r"is a directory without config\.json .*model\.path=<local directory",
        tmp_path / "weights.bin": r"is a file, not a model directory",
        tmp_path / "missing" / "export": r"does not exist \(relative to .*\); a hub id looks "
                                         r"like org/name",
    }
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=rf"model\.path='{path}' {message}"):
            _stage(compose_cfg, tmp_path, "sft", f"model.path={path}")


def test_plugin_that_crashes_on_import(compose_cfg, tmp_path, monkeypatch, no_weights):
    (tmp_path / "crashing_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points

    def patched(group):
        extra = [EntryPoint("crash", "crashing_plugin:Thing", group)]
        return list(real(group=group)) + (extra if group == registry.OBJECTIVES.group else [])

    monkeypatch.setattr(registry, "entry_points", patched)
    with pytest.raises(PluginError, match=r"objective plugin 'crash' \(entry point "
                       r"'crashing_plugin:Thing'\) failed to import: RuntimeError: boom at import"):
        _stage(compose_cfg, tmp_path, "dpo", "method.objective.name=crash",
               "~method.objective.beta", "~method.objective.label_smoothing",
               "~method.objective.rpo_alpha")


@pytest.mark.slow
def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    path = _jsonl(tmp_path, _with([GOOD_PAIR] * 20, 2, {"prompt": U, "chosen": A, "rejected": A}))
    out = run_cli("method=dpo", f"data.path={path}", "data.task=null", *TINY,
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"ptlight: error: {path}, row 2: ")
    assert "Traceback" not in out.stderr
    out = run_cli("method=nope", f"hydra.run.dir={tmp_path / 'run2'}", cwd=REPO)
    assert out.returncode == 1 and "Available options in 'method'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a tokenizer or model is loaded: config values are checked first."""
    import ptlight.train

    for name in ("load_tokenizer", "build_policy"):
        monkeypatch.setattr(ptlight.train, name, lambda *a, _n=name: pytest.fail(f"{_n} ran"))


CONFIG_CASES = [
    ("data.batch_size=0", r"data\.batch_size=0: examples per device per step; write a whole "
                          r"number >= 1, e\.g\. data\.batch_size=8"),
    ("data.batch_size=-4", r"data\.batch_size=-4: examples per device"),
    ("data.batch_size=abc", r"data\.batch_size='abc': examples per device"),
    ("data.max_length=0", r"data\.max_length=0: tokens of prompt \+ completion; a row needs at "
                          r"least one of each; write a whole number >= 2"),
    ("data.max_length=1", r"data\.max_length=1: tokens of prompt"),
    ("data.num_train=-5", r"data\.num_train=-5: training rows the task generates; write a "
                          r"whole number >= 1"),
    ("data.val_size=0", r"data\.val_size=0: rows held out for validation \(or set "
                        r"data\.val_path=<file>\)"),
    ("data.num_workers=-1", r"data\.num_workers=-1: DataLoader worker processes \(0: collate in "
                            r"the main process; auto: 2 where a CUDA step packs, else 0\); write "
                            r"a whole number >= 0"),
    ("data.pin_memory=yes", r"data\.pin_memory='yes': whether the DataLoader pins batches"),
    ("model.compile=yes", r"model\.compile='yes': use model\.compile=true"),
    ("model.fuse_projections=yes", r"model\.fuse_projections='yes': whether sibling projections"),
    ("method.pack_multiple_of=0", r"method\.pack_multiple_of=0: use auto, or 1 \(no rounding\) "
                                  r"up to method\.pack_max_tokens=2048"),
    ("method.optim.lr=nan", r"method\.optim\.lr=nan: the learning rate must be a finite number "
                            r"> 0\.0; e\.g\. method\.optim\.lr=5e-5"),
    ("method.optim.lr=-1e-3", r"method\.optim\.lr=-0\.001: the learning rate must be"),
    ("method.optim.lr=fast", r"method\.optim\.lr='fast': the learning rate must be"),
    ("method.optim.warmup_ratio=2", r"method\.optim\.warmup_ratio=2: the share of steps spent "
                                    r"warming up must be a finite number >= 0\.0 and <= 1\.0"),
    ("method.optim.weight_decay=-1", r"method\.optim\.weight_decay=-1: the weight decay"),
    ("method.optim.betas=[0.9]", r"method\.optim\.betas=\[0\.9\]: AdamW takes two numbers"),
    ("method.optim.betas=[0.9,1.0]", r"method\.optim\.betas\[1\]=1\.0: an AdamW beta must be "
                                     r"below 1"),
    ("method.optim.scheduler=cosine_annealing",
     r"method\.optim\.scheduler='cosine_annealing' is not a schedule ptlight can run; use one of "
     r"linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
     r"inverse_sqrt"),
    ("method.optim.scheduler=reduce_lr_on_plateau", r"scheduler='reduce_lr_on_plateau' is not"),
    ("trainer.max_steps=-1", r"trainer\.max_steps=-1: the number of optimiser steps, a whole "
                             r"number >= 1 .*or trainer\.max_steps=-1 together with "
                             r"trainer\.max_epochs=<N>"),
    ("trainer.max_steps=0", r"trainer\.max_steps=0: the number of optimiser steps"),
    ("trainer.accumulate_grad_batches=0", r"trainer\.accumulate_grad_batches=0: batches whose "
                                          r"gradients make one optimiser step; write a whole "
                                          r"number >= 1"),
    ("trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val=-1: the gradient clipping "
                                     r"threshold \(0 or null: no clipping\) must be a finite "
                                     r"number >= 0\.0"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0: validate every N training "
                                     r"steps \(a whole number >= 1"),
    ("trainer.val_check_interval=1.5", r"trainer\.val_check_interval=1\.5: validate every N"),
    ("checkpoint.every_n_train_steps=-1", r"checkpoint\.every_n_train_steps=-1: optimiser "
                                          r"steps between checkpoints \(0: at each epoch's end "
                                          r"only\); write a whole number >= 0"),
    ("checkpoint.every_n_train_steps=abc", r"checkpoint\.every_n_train_steps='abc'"),
    ("trainer.log_every_n_steps=-1", r"trainer\.log_every_n_steps=-1: optimiser steps between "
                                     r"logged training metrics \(0: none\)"),
    ("seed=abc", r"seed='abc': the run's random seed; write a whole number >= 0"),
    ("seed=5000000000", r"seed=5000000000: numpy's random generator takes seeds up to "
                        r"4294967295; write a smaller whole number, e\.g\. seed=0"),
    ("eval.num_prompts=-1", r"eval\.num_prompts=-1: held-out prompts the gold evaluation "
                            r"generates for \(0: no gold evaluation\); write a whole number >= 0"),
    ("eval.num_prompts=abc", r"eval\.num_prompts='abc': held-out prompts"),
    ("eval.batch_size=0", r"eval\.batch_size=0: prompts generated for at once; write a whole "
                          r"number >= 1"),
    ("eval.max_new_tokens=0", r"eval\.max_new_tokens=0: tokens generated per prompt at most"),
    ("eval.num_samples=-1", r"eval\.num_samples=-1: generations kept in eval\.json"),
    ("eval.val_samples=-2", r"eval\.val_samples=-2: held-out prompts generated at every "
                            r"validation \(0: off\)"),
    ("eval.num_pairs=-1", r"eval\.num_pairs=-1: held-out pairs for preference accuracy"),
    ("eval.before=yes", r"eval\.before='yes': whether the starting model is evaluated too; "
                        r"write eval\.before=true or eval\.before=false \(unquoted\)"),
    ("eval.do_sample=1", r"eval\.do_sample=1: greedy \(false\) or sampled \(true\) generation"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_values_fail_before_anything_loads(compose_cfg, tmp_path, nothing_loads, override,
                                               message):
    with pytest.raises(ConfigError, match=message):
        _stage(compose_cfg, tmp_path, "dpo", override)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_sampling_at_temperature_zero_fails_before_anything_loads(compose_cfg, tmp_path,
                                                                  nothing_loads):
    with pytest.raises(ConfigError, match=r"eval\.temperature=0: the sampling temperature "
                                          r"\(eval\.do_sample=true\) must be a finite number > 0"):
        _stage(compose_cfg, tmp_path, "dpo", "eval.do_sample=true", "eval.temperature=0")
    with pytest.raises(pytest.fail.Exception, match="load_tokenizer ran"):  # greedy: ignored
        _stage(compose_cfg, tmp_path, "dpo", "eval.temperature=0")


def test_max_steps_minus_one_runs_max_epochs(compose_cfg, tmp_path, nothing_loads):
    """Lightning's "no step limit" is fine when an epoch limit ends the run."""
    with pytest.raises(pytest.fail.Exception, match="load_tokenizer ran"):  # past the checks
        _stage(compose_cfg, tmp_path, "dpo", "trainer.max_steps=-1", "trainer.max_epochs=1")


# ---- data files: each error names the file (and row or line) and the fix --------------------
def _data(compose_cfg, kind, *overrides):
    """A set-up data module of ``kind`` on the composed ``data``/``model`` config."""
    from ptlight.model.backbone import load_tokenizer
    from ptlight.data.module import PtlDataModule

    cfg = compose_cfg("method=sft", "data.task=null", *overrides)
    dm = PtlDataModule(cfg.data, load_tokenizer(cfg.model), kind)
    dm.setup()
    return dm


def test_small_files_hold_out_one_row_and_one_row_is_refused(compose_cfg, tmp_path, no_weights,
                                                             capsys):
    path = _jsonl(tmp_path, [GOOD_SFT] * 5)
    dm = _data(compose_cfg, "sft", f"data.path={path}")  # under 10 rows: 4 train + 1 held out
    assert (dm.report()["train_rows"], dm.report()["val_rows"]) == (4, 1)
    assert dm.report()["notes"] == [f"data.val_size=64 but {path} has 5 rows: 1 held out for "
                                    "validation (at most a tenth of the rows); set "
                                    "data.val_path=<file> to validate on rows of your own"]
    assert f"[ptlight] data: data.val_size=64 but {path} has 5 rows" in capsys.readouterr().out
    one = _jsonl(tmp_path, [GOOD_SFT], "one.jsonl")
    with pytest.raises(DataError, match=r"one\.jsonl: 1 row; a file needs at least 2 \(one to "
                       r"train on, one held out for validation\)\. Add rows, or set "
                       r"data\.val_path=<file>"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={one}", "data.task=null")


def test_val_size_within_a_tenth_is_taken_as_given(compose_cfg, tmp_path):
    path = _jsonl(tmp_path, [GOOD_SFT] * 50)
    dm = _data(compose_cfg, "sft", f"data.path={path}", "data.val_size=3")
    assert (dm.report()["train_rows"], dm.report()["val_rows"], dm.report()["notes"]) == (47, 3, [])


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n\r\n\n"),
                                          ("empty.json", ""), ("empty.csv", ""),
                                          ("header.csv", "prompt,completion\n"),
                                          ("array.json", "[]")])
def test_empty_files(compose_cfg, tmp_path, no_weights, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}: no rows \(the file is empty or holds only "
                       r"blank lines\); point data\.path at a file with data"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={tmp_path / name}", "data.task=null")


@pytest.mark.parametrize("path", ["data/train.txt", "data/train.jsonl", "notes/sft",
                                  "train.txt", "./train"])
def test_missing_local_path_is_not_looked_up_on_the_hub(compose_cfg, tmp_path, no_weights,
                                                        monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match=rf"'{re.escape(path)}': no such file or directory "
                       r"\(relative to .*\); fix data\.path \(a hub data set id looks like "
                       r"org/name\)"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={path}", "data.task=null")


def test_numeric_strings_keep_their_type_so_the_bad_row_is_named(compose_cfg, tmp_path,
                                                                 no_weights):
    rows = [{"prompt": "12", "completion": " 34"}] * 20  # valid rows of digits
    path = _jsonl(tmp_path, _with(rows, 7, {"prompt": "12", "completion": 34}))
    with pytest.raises(DataError, match=r"data\.jsonl, row 7: column 'completion' must be a "
                       r"string or a list of \{'role', 'content'\} messages, got int"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={path}", f"data.val_path={path}",
               "data.task=null")


def test_csv_cells_are_strings_except_label_and_margin(compose_cfg, tmp_path, no_weights):
    sft = tmp_path / "sft.csv"
    sft.write_text("prompt,completion\n" + "42,NA\n" * 10 + "Q: null?,None\n" * 10)
    dm = _data(compose_cfg, "sft", f"data.path={sft}")
    assert dm.report()["train_rows"] + dm.report()["val_rows"] == 20
    kto = tmp_path / "kto.csv"  # a BOM and CRLF line ends too
    kto.write_bytes(b"\xef\xbb\xbfprompt,completion,label\r\n"
                    + b"Q:,1,TRUE\r\n" * 10 + b"Q:,2,false\r\n" * 10)
    dm = _data(compose_cfg, "unpaired", f"data.path={kto}", f"data.val_path={kto}")
    assert sorted(it.label for it in dm.val) == [False] * 10 + [True] * 10
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion,label\n" + "Q:,a,true\n" * 5 + "Q:,b,maybe\n"
                   + "Q:,c,0\n" * 5)
    with pytest.raises(DataError, match=r"bad\.csv, row 5: column 'label' must be a boolean "
                       r"\(true/false or 1/0\), got 'maybe'"):
        _stage(compose_cfg, tmp_path, "kto", f"data.path={bad}", f"data.val_path={bad}",
               "data.task=null")
    extra = tmp_path / "extra.csv"
    extra.write_text("prompt,completion\n" + "Q:,a\n" * 3 + "Q:,b,c\n")
    with pytest.raises(DataError, match=r"extra\.csv, line 5: 3 cells but the header has 2 "
                       r"columns"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={extra}", "data.task=null")


def test_json_array_and_bom_jsonl_read_as_rows(compose_cfg, tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([GOOD_SFT] * 20))
    assert _data(compose_cfg, "sft", f"data.path={array}").report()["train_rows"] == 18
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(GOOD_SFT).encode()
                                                   for _ in range(20)) + b"\r\n")
    assert _data(compose_cfg, "sft", f"data.path={bom}").report()["train_rows"] == 18


MESSAGE_CASES = {
    "no content": ({"prompt": U, "completion": [{"role": "assistant"}]},
                   r"column 'completion', message 0 has no 'content' \(it has \['role'\]\)"),
    "content not a string": ({"prompt": [{"role": "user", "content": ["hi"]}], "completion": A},
                             r"column 'prompt', message 0: 'content' must be a string, got list"),
    "unknown role": ({"prompt": [{"role": "wizard", "content": "hi"}], "completion": A},
                     r"column 'prompt', message 0 has role 'wizard'; the roles chat templates "
                     r"know are system, user, assistant, tool"),
    "no role": ({"prompt": [{"content": "hi"}], "completion": A},
                r"column 'prompt', message 0 has role None"),
    "not an object": ({"prompt": ["hi"], "completion": A},
                      r"column 'prompt', message 0 is a str, not a \{'role', 'content'\} object"),
}


@pytest.mark.parametrize("case", MESSAGE_CASES)
def test_bad_messages_name_the_message(compose_cfg, tmp_path, no_weights, case):
    row, message = MESSAGE_CASES[case]
    path = _jsonl(tmp_path, _with([GOOD_SFT] * 20, 3, row))
    with pytest.raises(DataError, match=r"data\.jsonl, row 3: " + message):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={path}", f"data.val_path={path}",
               "data.task=null")


def test_model_dir_without_tokenizer_files(compose_cfg, tmp_path, no_weights):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=rf"model\.path='{model}' holds no tokenizer files "
                       r"\(tokenizer\.json, tokenizer_config\.json, tokenizer\.model, \.\.\.\)\. "
                       r"Copy the model's tokenizer files there"):
        _stage(compose_cfg, tmp_path, "sft", f"model.path={model}")
    with pytest.raises(ModelLoadError, match=rf"model\.tokenizer='{model}' holds no tokenizer"):
        _stage(compose_cfg, tmp_path, "sft", f"model.tokenizer={model}")


def test_text_files_are_refused_alone_and_in_a_directory(compose_cfg, tmp_path, no_weights):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("remember the milk\n")
    (notes / "b.txt").write_text("call back\n")
    with pytest.raises(DataError, match=r"notes: a directory with no "
                       r"\.csv/\.json/\.jsonl/\.parquet files \(found: a\.txt, b\.txt\); point "
                       r"data\.path at a data file or a directory of them"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={notes}", "data.task=null")
    with pytest.raises(DataError, match=r"a\.txt: unsupported file type '\.txt'"):
        _stage(compose_cfg, tmp_path, "sft", f"data.path={notes / 'a.txt'}", "data.task=null")


@pytest.mark.parametrize("label", [True, False])
def test_kto_data_with_one_kind_of_label_is_refused(compose_cfg, tmp_path, no_weights, label):
    path = _jsonl(tmp_path, [{**GOOD_SFT, "label": label}] * 20)
    good, bad = (18, 0) if label else (0, 18)
    with pytest.raises(DataError, match=rf"data\.jsonl: KTO needs both desirable \(label true\) "
                       rf"and undesirable \(label false\) examples; the training split has {good} "
                       rf"desirable and {bad} undesirable\. Add rows of the missing kind"):
        _stage(compose_cfg, tmp_path, "kto", f"data.path={path}", "data.task=null")


# ---- logger=wandb with credentials but no network ---------------------------------------------
def test_wandb_without_network_goes_offline_in_seconds(monkeypatch, capfd):
    """This machine has no route to api.wandb.ai: the probe answers in seconds, not minutes."""
    import time

    from ptlight.config import wandb_base_url, wandb_offline

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest's offline mode skips the probe
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert wandb_base_url().startswith("https://api.")  # wandb's default server
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    assert wandb_offline() is True and wandb_offline() is True
    assert time.monotonic() - started < 10
    err = capfd.readouterr().err
    assert err.count(f"[ptlight] wandb: {wandb_base_url()} does not answer (no network?); "
                     "logging offline under <run dir>/wandb, upload later with `wandb sync") == 1


def test_wandb_with_a_server_that_answers_stays_online(monkeypatch):
    import socket

    from ptlight.config import wandb_offline

    server = socket.create_server(("127.0.0.1", 0))  # a local "wandb server" that accepts
    try:
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_offline() is False
        monkeypatch.delenv("WANDB_API_KEY")
        monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc login either
        assert wandb_offline() is True  # no credentials: offline, as before
    finally:
        server.close()


@pytest.mark.slow
def test_wandb_run_without_network_finishes_offline(tmp_path):
    import os
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="0" * 40, HF_HUB_OFFLINE="1", HOME=str(tmp_path))
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ptlight", "method=sft", "logger=wandb", "eval.before=false",
         f"hydra.run.dir={tmp_path / 'run'}", *TINY],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("does not answer (no network?); logging offline") == 1
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "offline: true" in (tmp_path / "run" / "config.yaml").read_text()
    print(f"run took {time.monotonic() - started:.0f} s")


# ---- python -m ptlight.eval: its keys, named in its errors, before any weights load -------------
@pytest.mark.parametrize("override,message", [
    ("eval.baseline=./no/such/model", r"eval\.baseline='\./no/such/model' does not exist \(relative "
                                      r"to .*\); a hub id looks like org/name\. Pass "
                                      r"eval\.baseline=<local directory"),
    ("eval.reference=/no/such/model", r"eval\.reference='/no/such/model' does not exist"),
    ("eval.acceptance.path=./no/such.jsonl", r"'\./no/such\.jsonl': no such file or directory "
                                             r"\(relative to .*\); fix eval\.acceptance\.path"),
    ("eval.acceptance.threshold=abc", r"eval\.acceptance\.threshold='abc': the score at or above "
                                      r"which a generation counts as accepted must be a finite "
                                      r"number; e\.g\. eval\.acceptance\.threshold=1\.0"),
    ("eval.num_prompts=0", r"eval\.num_prompts=0 with task 'sort': the evaluation generates for "
                           r"the task's held-out prompts"),
])
def test_eval_app_names_its_own_keys_before_anything_loads(compose_cfg, tmp_path, monkeypatch,
                                                          override, message):
    import ptlight.eval.app as app

    monkeypatch.setattr(app, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises((ConfigError, ModelLoadError, DataError), match=message):
        app.run_eval(compose_cfg(*TINY, "eval.num_prompts=4", override), tmp_path / "eval")


def test_a_missing_validation_file_names_data_val_path(compose_cfg, tmp_path):
    path = _jsonl(tmp_path, [GOOD_SFT] * 5)
    with pytest.raises(DataError, match=r"'\./no/val\.jsonl': no such file or directory .*fix "
                                        r"data\.val_path"):
        _data(compose_cfg, "sft", f"data.path={path}", "data.val_path=./no/val.jsonl")
