"""End to end through the real CLI: the default pipeline, separate stages, multirun, errors,
loggers, a plugin installed from a throwaway distribution, and a non-editable wheel install."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import REPO, TINY, run_cli, venv_with_our_packages

pytestmark = pytest.mark.slow


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`python -m ptlight` (SFT -> DPO) with tiny values; returns the run dir and stdout."""
    run_dir = tmp_path_factory.mktemp("pipeline")
    proc = _ok(run_cli(f"hydra.run.dir={run_dir}", *TINY))
    return run_dir, proc.stdout


def test_pipeline_writes_every_run_output(pipeline_run):
    run_dir, stdout = pipeline_run
    for stage in ("0-sft", "1-dpo"):
        d = run_dir / stage
        assert (d / "config.yaml").is_file() and (d / "checkpoints" / "last.ckpt").is_file()
        assert "train/loss" in (d / "metrics.csv").read_text().splitlines()[0]
        report = json.loads((d / "eval.json").read_text())
        assert 0.0 <= report["after"]["gold/reward"] <= 1.0
        assert report["after"]["num_prompts"] == 8 and report["global_step"] == 3
    assert "before" in json.loads((run_dir / "0-sft" / "eval.json").read_text())
    dpo_cfg = (run_dir / "1-dpo" / "config.yaml").read_text()
    assert f"path: {run_dir / '0-sft' / 'export'}" in dpo_cfg  # DPO starts from the SFT export
    assert "after dpo" in stdout and "gold reward" in stdout
    assert [r["stage"] for r in json.loads((run_dir / "pipeline.json").read_text())] == ["sft", "dpo"]


def test_export_loads_with_plain_transformers(pipeline_run):
    export = pipeline_run[0] / "1-dpo" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "Lfm2ForCausalLM" and tok.eos_token == "<|im_end|>"
    assert (export / "model.safetensors").is_file()
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_separate_dpo_stage_as_a_multirun_sweep(pipeline_run, tmp_path):
    sft_export = pipeline_run[0] / "0-sft" / "export"
    _ok(run_cli("-m", "method=dpo", f"model.path={sft_export}", "method.objective.beta=0.05,0.1",
                f"hydra.sweep.dir={tmp_path}", *TINY))
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    betas = [json.loads((j / "eval.json").read_text()) and
             (j / "config.yaml").read_text().split("beta: ")[1].split()[0] for j in jobs]
    assert sorted(betas) == ["0.05", "0.1"]
    for j in jobs:  # the starting point was the SFT export, not a fresh model
        assert f"path: {sft_export}" in (j / "config.yaml").read_text()
        assert (j / "export" / "model.safetensors").is_file()


def test_hub_model_offline_fails_fast_with_one_clear_message(tmp_path):
    start = time.time()
    proc = run_cli("method=dpo", "model=lfm2", f"hydra.run.dir={tmp_path}",
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and time.time() - start < 60
    assert "LiquidAI/LFM2-350M" in proc.stderr
    assert "model.path=" in proc.stderr and "model=lfm2-tiny" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_logger_runs_offline_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc login either
    proc = subprocess.run([sys.executable, "-m", "ptlight", "method=sft", "logger=wandb",
                           f"hydra.run.dir={tmp_path / 'run'}", "eval.before=false", *TINY],
                          env=env, capture_output=True, text=True, timeout=600)
    _ok(proc)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


PLUGIN = '''
import torch.nn.functional as F
from ptlight.objectives import Logps, Objective, ObjectiveOutput


class Toy(Objective):
    """DPO with the log-ratio margin squashed by tanh: a throwaway third-party loss."""

    name = "toy_tanh"
    needs_reference = True
    data_kind = "pairwise"

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.0):  # dpo.yaml's keys
        super().__init__()
        self.beta = beta

    def forward(self, inputs: Logps) -> ObjectiveOutput:
        rho = inputs.policy - inputs.reference
        losses = F.softplus(-(self.beta * (rho[:, 0] - rho[:, 1])).tanh())
        return ObjectiveOutput(loss=losses.mean(), losses=losses, metrics={})
'''


def test_plugin_installed_from_a_temp_distribution_is_found_and_used(pipeline_run, tmp_path):
    src = tmp_path / "toy-plugin"
    (src / "toy_plugin").mkdir(parents=True)
    (src / "toy_plugin" / "__init__.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "toy-plugin"
        version = "0.0.1"
        [project.entry-points."ptlight.objectives"]
        toy_tanh = "toy_plugin:Toy"
    '''))
    site = tmp_path / "site"
    _ok(subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(src)],
                       capture_output=True, text=True))
    env = {"PYTHONPATH": str(site)}
    found = _ok(subprocess.run(
        [sys.executable, "-c", "from ptlight.objectives import get_objective, plugin_info;"
         "print(get_objective('toy_tanh').__module__);"
         "print([(p.distribution, p.version) for p in plugin_info() if p.name == 'toy_tanh'])"],
        env={**os.environ, **env}, capture_output=True, text=True))
    assert "toy_plugin" in found.stdout and "('toy-plugin', '0.0.1')" in found.stdout
    run_dir = tmp_path / "run"
    _ok(run_cli("method=dpo", "method.objective.name=toy_tanh", "~method.objective.rpo_alpha",
                f"model.path={pipeline_run[0] / '0-sft' / 'export'}", f"hydra.run.dir={run_dir}",
                "eval.before=false", *TINY, env=env))
    assert json.loads((run_dir / "eval.json").read_text())["objective"] == "toy_tanh"


def test_wheel_install_finds_its_configs(tmp_path):
    """A non-editable wheel must carry conf/ and the tokenizer (no source checkout around)."""
    wheels = tmp_path / "wheels"
    _ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(REPO)], capture_output=True, text=True))
    venv = tmp_path / "venv"
    py = venv_with_our_packages(venv)  # works inside a virtualenv and outside one
    _ok(subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index",
                        str(next(wheels.glob("ptlight-*.whl")))], capture_output=True, text=True))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _ok(subprocess.run([str(py), "-c", "import ptlight, ptlight.config as c;"
                                "print(ptlight.__file__); print(c.config_dir())"],
                               cwd=tmp_path, env=env, capture_output=True, text=True)).stdout
    assert str(venv) in where.splitlines()[0] and str(venv) in where.splitlines()[1]
    job = _ok(subprocess.run([str(py), "-m", "ptlight", "method=dpo", "--cfg", "job"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)).stdout
    assert "model_type: lfm2" in job and "name: dpo" in job
    tok = _ok(subprocess.run([str(py), "-c", "from ptlight.model.backbone import BUNDLED_TOKENIZER as b;"
                              "from transformers import AutoTokenizer;"
                              "print(len(AutoTokenizer.from_pretrained(b)))"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)).stdout
    assert int(tok) > 256
