"""Security defaults: no remote code unless asked, pickle-free checkpoint loading, safetensors
exports, and no secrets in the run dir or logs."""

from __future__ import annotations

import ast
import os
import secrets
import subprocess
import sys

import pytest

from helpers import REPO, TINY, tiny_model_cfg

PACKAGE = REPO / "ptlight"


def _calls(name: str):
    """(file, line, ast.Call) for every call of ``<x>.<name>(...)`` in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == name:
                yield path.relative_to(REPO), node.lineno, node


def test_every_torch_load_is_weights_only():
    found = list(_calls("load"))
    for path, line, call in found:
        if not (isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"):
            continue
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{path}:{line}: torch.load without weights_only=True"
    assert not [p for p in PACKAGE.rglob("*.py") if "import pickle" in p.read_text()]


def test_lightning_checkpoints_are_read_weights_only(compose_cfg, tmp_path):
    """The checkpoint IO every trainer gets refuses a pickled object in a checkpoint."""
    import torch

    from ptlight.runtime.callbacks import AtomicCheckpointIO

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_model_loading_has_one_home_that_passes_trust_remote_code():
    """Every transformers load goes through backbone.py, and each passes the config's flag."""
    loads = [(p, line) for p, line, _ in _calls("from_pretrained")
             if str(p) != "ptlight/model/backbone.py"]
    assert loads == [], f"from_pretrained outside ptlight/model/backbone.py: {loads}"
    for path, line, call in _calls("from_pretrained"):
        target = ast.unparse(call.func.value)
        if target.startswith("Peft"):  # adapters: peft has no remote code
            continue
        keys = {k.arg for k in call.keywords}
        assert "trust_remote_code" in keys or None in keys, f"{path}:{line}"
    for node in ast.walk(ast.parse((PACKAGE / "model" / "backbone.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_from_pretrained":
            assert "trust_remote_code" in {k.arg for k in node.keywords}, node.lineno


def test_trust_remote_code_is_off_unless_asked(compose_cfg, tmp_path, monkeypatch):
    import transformers

    from ptlight.model import backbone

    assert compose_cfg().model.trust_remote_code is False
    assert compose_cfg("model=lfm2").model.trust_remote_code is False
    tok = backbone.load_tokenizer(tiny_model_cfg())
    backbone.build_policy(tiny_model_cfg(), tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for asked in (False, True):
        cfg = tiny_model_cfg()
        cfg.path, cfg.trust_remote_code = str(tmp_path / "m"), asked
        seen.clear()
        backbone.build_policy(cfg, backbone.load_tokenizer(cfg))
        assert seen and all(v is asked for v in seen)


def test_exports_are_safetensors_only(compose_cfg, tmp_path):
    from ptlight.train import train_stage

    train_stage(compose_cfg("method=sft", "eval.before=false", "eval.val_samples=0", *TINY),
                tmp_path)
    files = [p.name for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


@pytest.mark.slow
def test_wandb_api_key_never_lands_in_the_run_dir_or_logs(tmp_path):
    secret = secrets.token_hex(20)  # 40 characters, the shape of a real key
    env = {**os.environ, "WANDB_API_KEY": secret, "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ptlight", "method=sft", "logger=wandb", "eval.before=false",
         f"hydra.run.dir={run_dir}", *TINY],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb did not write its files"
    assert secret not in proc.stdout + proc.stderr
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a tokenizer or model is loaded: the flags are checked first."""
    import ptlight.train

    for name in ("load_tokenizer", "build_policy"):
        monkeypatch.setattr(ptlight.train, name, lambda *a, _n=name: pytest.fail(f"{_n} ran"))


@pytest.mark.parametrize("value", ["'false'", "no", "'true'", "off", "0", "1"])
def test_trust_remote_code_takes_a_real_bool_only(compose_cfg, tmp_path, nothing_loads, value):
    from ptlight.errors import ConfigError
    from ptlight.train import train_stage

    cfg = compose_cfg("method=sft", f"model.trust_remote_code={value}", *TINY)
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code=.*: this security setting "
                       r"takes a boolean only, written unquoted"):
        train_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # not even config.yaml is written


def test_security_flags_anywhere_in_the_tree_and_from_the_environment(compose_cfg, tmp_path,
                                                                      nothing_loads, monkeypatch):
    from ptlight.errors import ConfigError
    from ptlight.train import train_stage

    monkeypatch.setenv("PTL_TRUST", "false")  # an environment variable is always a string
    cases = {"model.trust_remote_code=${oc.env:PTL_TRUST}": r"model\.trust_remote_code='false'",
             "+judge.trust_remote_code=no": r"judge\.trust_remote_code='no'",
             "+data.allow_pickle=yes": r"data\.allow_pickle='yes'"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train_stage(compose_cfg("method=sft", override, *TINY), tmp_path / "run")
    for ok in ("true", "false"):  # real booleans pass the check (and then load the tokenizer)
        with pytest.raises(pytest.fail.Exception, match="load_tokenizer ran"):
            train_stage(compose_cfg("method=sft", f"model.trust_remote_code={ok}", *TINY),
                        tmp_path / "run")


def test_the_model_loader_refuses_a_string_flag_too():
    """ptlight.eval, ptlight.label and the judges load through the same loader."""
    from ptlight.model import backbone
    from ptlight.errors import ConfigError

    cfg = tiny_model_cfg()
    cfg.trust_remote_code = "false"
    with pytest.raises(ConfigError, match=r"trust_remote_code='false' for the tokenizer of "
                       r"'.*lfm2-tiny-tokenizer': a boolean only"):
        backbone.load_tokenizer(cfg)
