"""The one backbone builder every method shares: tokenizer, policy and reference.

- ``model.path`` set: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` on a hub id or
  a local directory (an earlier ptlight export works). ``trust_remote_code`` stays off unless
  the config turns it on. A model that cannot be loaded (offline hub id, a directory that is
  not a model) raises :class:`~ptlight.errors.ModelLoadError` naming the ways out; there is never
  a silent fallback to random weights.
- ``model.path`` null: the architecture is built from ``model.arch`` (a transformers config,
  e.g. ``model_type: lfm2``) with fresh weights and the tokenizer bundled with ptlight. This is
  ``model=lfm2-tiny``, the offline default.

The reference model is a frozen deep copy (``requires_grad=False``, eval mode) that the method
keeps outside its registered modules, so checkpoints do not carry it twice.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ptlight.errors import ConfigError, ModelLoadError

BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "lfm2-tiny-tokenizer"
_WAYS_OUT = (
    "Pass model.path=<local directory with config.json and weights> (for example a copy made "
    "with `huggingface-cli download` on a machine with internet, or a previous ptlight export), "
    "or use model=lfm2-tiny, which builds a small LFM2 offline."
)


def _check_local_dir(path: str) -> None:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"model.path={path!r} is a file, not a model directory. {_WAYS_OUT}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model.path={path!r} is a directory without config.json, so it is not a transformers "
            f"model directory. {_WAYS_OUT}"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(loader, source: str, what: str, **kwargs):
    """``loader.from_pretrained`` that fails in seconds, with the ways out, when offline.

    A local directory or a hub id already in the local cache loads without the network. An
    uncached hub id is only fetched when the hub answers one quick connect; otherwise (offline,
    firewalled) the user gets one message instead of a minute of retries.
    """
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except Exception as local_exc:
        if Path(source).expanduser().is_dir():
            raise ModelLoadError(f"could not load the {what} of {source!r}: {local_exc}") from None
    if not _hub_reachable():
        raise ModelLoadError(
            f"could not load the {what} of {source!r}: it is not a local directory, not in the "
            f"Hugging Face cache, and the hub cannot be reached (offline). {_WAYS_OUT}"
        )
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(
            f"could not load the {what} of {source!r} ({type(exc).__name__}: {first}). {_WAYS_OUT}"
        ) from exc


def load_tokenizer(model_cfg: DictConfig):
    """The tokenizer of ``model.path``, ``model.tokenizer`` or the bundled one (in that order)."""
    source = model_cfg.tokenizer or model_cfg.path or str(BUNDLED_TOKENIZER)
    if source == model_cfg.path:
        _check_local_dir(source)
    tok = _from_pretrained(AutoTokenizer, source, "tokenizer",
                           trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Many base models ship without a pad token; a dedicated one would change the vocab, so
        # reuse EOS. Padding is always masked out of losses, and EOS labels are kept by position.
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelLoadError(
            f"the tokenizer of {source!r} has no chat template; conversational data needs one. "
            "Set model.tokenizer=<dir of a tokenizer with a chat template> or use plain-text data."
        )
    return tok


def _dtype(name: str) -> torch.dtype:
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype={name!r} is not a torch dtype (float32, bfloat16, ...)")
    return dtype


def build_policy(model_cfg: DictConfig, tokenizer) -> PreTrainedModel:
    """The trainable policy: pretrained from ``model.path`` or fresh from ``model.arch``."""
    dtype = _dtype(model_cfg.dtype)
    if model_cfg.path:
        _check_local_dir(model_cfg.path)
        model = _from_pretrained(AutoModelForCausalLM, model_cfg.path, "model", dtype=dtype,
                                 trust_remote_code=model_cfg.trust_remote_code)
    elif model_cfg.arch is not None:
        arch: dict[str, Any] = OmegaConf.to_container(model_cfg.arch, resolve=True)  # type: ignore[assignment]
        model_type = arch.pop("model_type")
        vocab = arch.pop("vocab_size", None) or len(tokenizer)
        config = AutoConfig.for_model(
            model_type,
            vocab_size=-(-vocab // 64) * 64,  # round up: friendlier matmul shapes
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **arch,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        raise ConfigError("set model.path (hub id or local dir) or model.arch (build from config)")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{model.get_input_embeddings().weight.shape[0]} rows; use the model's own tokenizer"
        )
    if model_cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it gets
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy in eval mode, used as the reference model."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
