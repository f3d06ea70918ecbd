"""Helpers the tests import (kept out of conftest.py: the plugin's tests have a conftest too,
and `from conftest import ...` would pick whichever was imported first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A 3-layer, 64-wide LFM2 (conv, conv, attention) and a handful of rows: seconds per run.
TINY = [
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=3",
    "model.arch.layer_types=[conv,conv,full_attention]",
    "data.num_train=64",
    "data.val_size=8",
    "data.batch_size=8",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_train_steps=3",
    "eval.num_prompts=8",
    "eval.max_new_tokens=8",
]
REPO = Path(__file__).resolve().parents[1]


def tiny_model_cfg(**extra):
    """A ``model`` config for the same 3-layer, 64-wide LFM2, for tests that build it directly
    (``extra``: more ``model.*`` keys, e.g. ``gradient_checkpointing=True``)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        **extra,
        "path": None, "tokenizer": None, "trust_remote_code": False, "dtype": "float32",
        "disable_dropout": True,
        "arch": {"model_type": "lfm2", "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "layer_types": ["conv", "conv", "full_attention"],
                 "block_auto_adjust_ff_dim": False},
    })


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ptlight <args>`` in a subprocess; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ptlight", *args], cwd=cwd, env=full_env, capture_output=True,
        text=True, timeout=timeout,
    )


def venv_with_our_packages(venv: Path) -> Path:
    """A fresh virtualenv at ``venv`` that imports the packages this interpreter has (torch,
    transformers, ...) but nothing installed in it yet; returns its python.

    ``venv --system-site-packages`` would not do: run from inside a virtualenv it exposes the
    *base* interpreter's site-packages, not the virtualenv's, where the README's install put the
    dependencies. So the new venv gets a ``.pth`` file naming this interpreter's site dirs. A
    ``.pth`` line only adds a directory (the ``.pth`` files inside it, such as an editable
    install's finder, are not run), so whatever is installed into the new venv comes first.
    """
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(purelib) / "_parent_site.pth").write_text("\n".join(ours) + "\n")
    return python


def pair_batch(length: int, seed: int) -> dict:
    """A collated pairwise batch of 3 prompts of different lengths (longest ``length − 6``
    tokens) with a chosen block of 5, 4, 3 completion tokens and a rejected block of 3 each:
    ragged rows, padding, and a prefix shared within each pair."""
    import torch

    from ptlight.data.module import pad_rows

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(length - 6 - i) for i in range(3)]
    seqs = [(p, ids(5 - i)) for i, p in enumerate(prompts)] + [(p, ids(3)) for p in prompts]
    return pad_rows(seqs, 0)


def prompt_block_batch(prompt_lens, completion_lens, k=2, seed=0, pad_id=0) -> dict:
    """K blocks of rows over the same prompts (the collate's layout, padded by its
    ``pad_rows``), random token ids: completion ``completion_lens[j][i]`` of prompt i in block
    j."""
    import torch

    from ptlight.data.module import pad_rows

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(n) for n in prompt_lens]
    seqs = [(p, ids(completion_lens[j][i])) for j in range(k) for i, p in enumerate(prompts)]
    return pad_rows(seqs, pad_id)


def scores_and_grads(model, args, **kwargs):
    """Completion log-probs of a batch (``args``: input_ids, attention_mask, loss_mask) and the
    gradient of their sum with respect to every parameter, from zeroed gradients."""
    from ptlight.engine.logps import completion_logps

    model.zero_grad()
    scores = completion_logps(model, *args, **kwargs)
    scores.sequence_sum().sum().backward()
    return scores.logps.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_scores_and_grads(got, want, atol: float, rtol: float) -> None:
    """Two :func:`scores_and_grads` results agree: log-probs within ``atol``, gradients within
    ``atol``/``rtol``."""
    import torch

    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def metrics_losses(run_dir) -> list[float]:
    """The ``train/loss`` column of a run's metrics.csv."""
    import csv

    with open(Path(run_dir) / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def dpo_losses(compose_cfg, run_dir, *overrides: str, steps: int = 3) -> list[float]:
    """Train the tiny DPO stage ``steps`` steps with ``overrides``; its training losses."""
    from ptlight.train import train_stage

    cfg = compose_cfg("method=dpo", "eval.before=false", *TINY, f"trainer.max_steps={steps}",
                      *overrides)
    train_stage(cfg, Path(run_dir))
    return metrics_losses(run_dir)


def tiny_chat_policy(seed: int = 0):
    """``(model in eval mode, tokenizer)``: the tiny LFM2 with the bundled chat tokenizer."""
    import torch

    from ptlight.model.backbone import build_policy, load_tokenizer

    torch.manual_seed(seed)
    cfg = tiny_model_cfg()
    tok = load_tokenizer(cfg)
    return build_policy(cfg, tok).eval(), tok


def chat_prompt_ids(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as a user turn through the chat template, with the generation
    prompt, as training renders prompts."""
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False).input_ids for t in texts]
