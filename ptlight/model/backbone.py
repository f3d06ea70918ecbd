"""The one backbone builder every method shares: tokenizer, policy and reference.

- ``model.path`` set: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` on a hub id or
  a local directory (an earlier ptlight export works). ``trust_remote_code`` stays off unless
  the config turns it on. A model that cannot be loaded (offline hub id, a directory that is
  not a model) raises :class:`~ptlight.errors.ModelLoadError` naming the ways out; there is never
  a silent fallback to random weights.
- ``model.path`` null: the architecture is built from ``model.arch`` (a transformers config,
  e.g. ``model_type: lfm2``) with fresh weights and the tokenizer bundled with ptlight. This is
  ``model=lfm2-tiny``, the offline default.

The reference model is one of the kinds in :mod:`ptlight.model.reference` (a frozen copy made
by :func:`frozen_copy`, or with LoRA the policy itself with its adapters switched off; see
"LoRA and QLoRA" below).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import (LoraConfig, PeftConfig, PeftModel, get_peft_model,
                  prepare_model_for_kbit_training)
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel)

from ptlight.engine.compile import compile_blocks
from ptlight.engine.cpu_bf16 import checkpoint_contexts
from ptlight.engine.flex import install_flex_attention
from ptlight.engine.norms import install_fused_norms
from ptlight.errors import ConfigError, ModelLoadError
from ptlight.model import masks
from ptlight.runtime.rundir import atomic_dir

BUNDLED_TOKENIZER = Path(__file__).parent.parent / "assets" / "lfm2-tiny-tokenizer"
log = logging.getLogger(__name__)
_WAYS_OUT = (
    "Pass model.path=<local directory with config.json and weights> (for example a copy made "
    "with `huggingface-cli download` on a machine with internet, or a previous ptlight export), "
    "or use model=lfm2-tiny, which builds a small LFM2 offline."
)


def _ways_out(key: str) -> str:
    if key == "model.path":
        return _WAYS_OUT
    return (f"Pass {key}=<local directory with config.json and weights> (for example a copy "
            "made with `huggingface-cli download` on a machine with internet, or a previous "
            "ptlight export).")


# Any one of these makes a directory loadable by AutoTokenizer (fast, BPE or SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def check_model_source(path: str, key: str = "model.path") -> None:
    """A local-looking ``path`` (the value of config key ``key``) is an existing model or
    adapter directory; hub ids (``org/name``) pass. Errors name ``key``."""
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or path.count("/") >= 2  # hub ids: org/name
    if looks_local and not p.exists():
        raise ModelLoadError(
            f"{key}={path!r} does not exist (relative to {Path.cwd()}); a hub id looks "
            f"like org/name. {_ways_out(key)}"
        )
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"{key}={path!r} is a file, not a model directory. {_ways_out(key)}")
    if p.is_dir() and not any((p / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelLoadError(
            f"{key}={path!r} is a directory without config.json (or adapter_config.json), so "
            f"it is not a transformers model (or PEFT adapter) directory. {_ways_out(key)}"
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
    trust = kwargs.get("trust_remote_code", False)
    if not isinstance(trust, bool):  # "false" as a string is truthy: refuse (ptlight.runtime.validate)
        raise ConfigError(f"trust_remote_code={trust!r} for the {what} of {source!r}: a boolean "
                          "only, written unquoted (false or true)")
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
    """The tokenizer of ``model.tokenizer``, ``model.path`` (an adapter dir without one: its
    base's) or the bundled one (in that order)."""
    source = model_cfg.tokenizer or model_cfg.path or str(BUNDLED_TOKENIZER)
    if source == model_cfg.path:
        check_model_source(source)
        adapter = _adapter_dir(source)
        if adapter is not None and not (adapter / "tokenizer_config.json").is_file():
            source = _adapter_base(adapter)  # an adapter saved without its tokenizer
    local = Path(source).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        key = "model.tokenizer" if source == model_cfg.tokenizer else "model.path"
        raise ModelLoadError(
            f"{key}={source!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...). "
            "Copy the model's tokenizer files there (tokenizer.save_pretrained), or set "
            "model.tokenizer=<dir or hub id of its tokenizer>."
        )
    tok = _from_pretrained(AutoTokenizer, source, "tokenizer",
                           trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Many base models ship without a pad token; a dedicated one would change the vocab, so
        # reuse EOS. Padding is always masked out of losses, and EOS labels are kept by position.
        tok.pad_token = tok.eos_token
    # No chat template is fine for plain-string data; the data module refuses message lists
    # (and data.task, whose prompts are messages) with such a tokenizer, naming the row.
    return tok


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype called ``name`` (the value of config key ``key``), or a ConfigError."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{key}={name!r} is not a torch dtype (float32, bfloat16, ...)")
    return dtype


def _base_model(model_cfg: DictConfig, tokenizer, source: str | None,
                load_kwargs: dict[str, Any]) -> PreTrainedModel:
    """Pretrained weights from ``source`` (a hub id or local dir), or fresh from ``model.arch``."""
    dtype = torch_dtype(model_cfg.dtype)
    if source:
        check_model_source(source)
        return _from_pretrained(AutoModelForCausalLM, source, "model", dtype=dtype,
                                trust_remote_code=model_cfg.trust_remote_code, **load_kwargs)
    if model_cfg.arch is None:
        raise ConfigError("set model.path (hub id or local dir) or model.arch (build from config)")
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
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_policy(model_cfg: DictConfig, tokenizer) -> PreTrainedModel:
    """The trainable policy: pretrained from ``model.path`` or fresh from ``model.arch``.

    With ``model.lora.enabled`` the base weights are frozen and LoRA adapters are trained; the
    returned object is still the plain transformers model (peft injects its layers in place),
    with its ``PeftModel`` reachable through :func:`peft_wrapper`. ``model.path`` may be a PEFT
    adapter directory: see :func:`_load_adapter`. Quantization is checked (and refused on CPU)
    before any weights load. SDPA never gets a query row that attends to nothing
    (:mod:`ptlight.model.masks`: left padding would otherwise turn to NaN on CUDA).
    ``model.fused_norm`` routes the RMSNorm layers through ``F.rms_norm``
    (:mod:`ptlight.engine.norms`; ``auto``, which a training run settles for its own device,
    is on here where CUDA is visible), ``model.packed_attention=flex`` gives packed scoring
    FlexAttention (:mod:`ptlight.engine.flex`) and ``model.compile`` compiles blocks
    (:mod:`ptlight.engine.compile`), in that order.
    """
    lora = lora_settings(model_cfg)
    load_kwargs = _quantization(model_cfg, lora)
    adapter = _adapter_dir(model_cfg.path)
    source = _adapter_base(adapter) if adapter is not None else model_cfg.path
    model = _base_model(model_cfg, tokenizer, source, load_kwargs)
    masks.install(model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{model.get_input_embeddings().weight.shape[0]} rows; use the model's own tokenizer"
        )
    if model_cfg.disable_dropout:  # before LoRA: model.lora.dropout is the user's own choice
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if load_kwargs:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter is not None:
        model = _load_adapter(model, adapter, trainable=lora is not None)
    elif lora is not None:
        model = _new_adapter(model, lora)
    if model_cfg.get("gradient_checkpointing"):
        # Non-reentrant: no requires-grad inputs needed (LoRA's frozen embeddings are fine),
        # and the layers' keyword arguments (the packed forward's conv chains) are replayed
        # as they were in the forward; the recomputation re-enters cpu_bf16's upcast mode
        # when the forward ran under it.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": checkpoint_contexts})
    model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it gets
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    fused_norm = model_cfg.get("fused_norm")
    if fused_norm == "auto":  # training settles it per run (devices.device_defaults); else:
        fused_norm = torch.cuda.is_available()
    if fused_norm is True and not install_fused_norms(model):
        log.warning("model.fused_norm=true: %s has no RMSNorm of a form ptlight fuses "
                    "(ptlight.engine.norms.RMSNORM_CLASSES); its norms run as they are",
                    type(model).__name__)
    if model_cfg.get("packed_attention") == "flex" and not install_flex_attention(model):
        log.warning("model.packed_attention=flex: %s has no LFM2 attention layer; packed "
                    "scoring (LFM2 only) does not run on it", type(model).__name__)
    if model_cfg.get("compile"):
        compile_blocks(model, blocks=model_cfg.get("compile") != "packed",
                       mode=model_cfg.get("compile_mode") or "default")
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy in eval mode, used as the reference model (compiled blocks are
    copied bound to the copy's own modules: tests/test_compile.py)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# ---- LoRA and QLoRA --------------------------------------------------------------------------
# ``model.lora`` (documented in conf/model/*.yaml): enabled, r, alpha, dropout, target_modules,
# quantize, merge. The rules, in one place:
# - Fresh LoRA (``model.path`` a full model or null): adapters named "default" start at B = 0,
#   so the policy starts equal to the base; the reference is the base (adapters disabled).
# - ``model.path`` a PEFT adapter dir: the base comes from ``<dir>/base`` when present (ptlight
#   writes it when the base had no other home), else from ``base_model_name_or_path`` of its
#   adapter_config.json. With LoRA on, the adapter is loaded twice: "default" (trainable) and
#   "reference" (frozen), so the reference is the starting adapter, not the bare base; the
#   adapter's own r/alpha/targets apply (``model.lora.r`` etc. are not used). With LoRA off the
#   adapter is merged into the base and the whole model is trained.
# - QLoRA (``quantize: 4bit``): NF4 base with double quantization and bf16 compute
#   (bitsandbytes, CUDA only), as in the QLoRA paper; refused on CPU before any weights load.

TRAINED_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
# Every linear projection of an LFM2 block: attention q/k/v/out, the short conv's in/out
# projections, and the SwiGLU MLP. Other architectures: peft's "all-linear" (all but lm_head).
DEFAULT_TARGET_MODULES = {"lfm2": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj",
                                   "w1", "w2", "w3"]}
_PEFT_ATTR = "_ptlight_peft_model"


def lora_settings(model_cfg: DictConfig) -> DictConfig | None:
    """``model.lora`` when enabled, else None (a model config without a ``lora`` block: off)."""
    lora = model_cfg.get("lora")
    return lora if lora is not None and lora.enabled else None


def _quantization(model_cfg: DictConfig, lora: DictConfig | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs for ``model.lora.quantize``; ConfigError where it cannot run."""
    block = model_cfg.get("lora")
    quantize = None if block is None else block.quantize
    if quantize is None:
        return {}
    if quantize != "4bit":
        raise ConfigError(f"model.lora.quantize={quantize!r}; use null or 4bit (QLoRA)")
    if lora is None:
        raise ConfigError("model.lora.quantize=4bit trains LoRA adapters on a 4-bit base; "
                          "also set model.lora.enabled=true")
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.lora.quantize=4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do "
            "not run on CPU. On CPU use plain LoRA (model.lora.quantize=null), optionally with "
            "model.dtype=bfloat16 to halve the weights' memory."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.lora.quantize=4bit needs bitsandbytes: pip install bitsandbytes")
    if not model_cfg.path:
        raise ConfigError("model.lora.quantize=4bit quantizes pretrained weights; set model.path")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def _adapter_dir(path: str | None) -> Path | None:
    """``path`` when it is a local PEFT adapter directory (has adapter_config.json)."""
    p = Path(path).expanduser() if path else None
    return p if p is not None and (p / "adapter_config.json").is_file() else None


def _adapter_base(adapter: Path) -> str:
    """Where the base model of an adapter directory lives (see the rules above)."""
    if (adapter / "base" / "config.json").is_file():
        return str(adapter / "base")
    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base:
        raise ModelLoadError(f"adapter {str(adapter)!r} does not name its base model "
                             "(base_model_name_or_path in adapter_config.json)")
    return base


def _attach(peft_model: PeftModel) -> PreTrainedModel:
    """The transformers model inside ``peft_model`` (adapters injected), remembering the wrapper.

    Methods and log-prob code keep working on a plain ``PreTrainedModel``; the wrapper is kept
    in the instance dict, not as a submodule, so state dicts and ``modules()`` are unchanged.
    """
    model = peft_model.get_base_model()
    model.__dict__[_PEFT_ATTR] = peft_model
    return model


def peft_wrapper(model: torch.nn.Module) -> PeftModel | None:
    """The ``PeftModel`` of a policy built with LoRA, else None."""
    return model.__dict__.get(_PEFT_ATTR)


def _new_adapter(model: PreTrainedModel, lora: DictConfig) -> PreTrainedModel:
    targets = lora.target_modules
    if targets is None:
        targets = DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")
    elif not isinstance(targets, str):
        targets = list(targets)
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=targets)
    try:
        return _attach(get_peft_model(model, config, adapter_name=TRAINED_ADAPTER))
    except ValueError as exc:
        raise ConfigError(f"model.lora.target_modules={targets!r}: {exc}") from exc


def _load_adapter(model: PreTrainedModel, adapter: Path, trainable: bool) -> PreTrainedModel:
    """Base + the adapter at ``adapter``: trainable, plus a frozen "reference" copy of it; or,
    when LoRA is off, merged into the base weights (the whole model is then trained)."""
    peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=TRAINED_ADAPTER,
                                           is_trainable=trainable)
    if not trainable:
        return peft_model.merge_and_unload()
    peft_model.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    peft_model.set_adapter(TRAINED_ADAPTER)  # active + trainable; "reference" stays frozen
    return _attach(peft_model)


def has_adapters(model: torch.nn.Module) -> bool:
    """True for a policy built with LoRA."""
    return peft_wrapper(model) is not None


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def export_model(policy: PreTrainedModel, tokenizer, export_dir: Path,
                 model_cfg: DictConfig, state_dict: dict[str, torch.Tensor] | None = None,
                 extras: Callable[[Path], None] | None = None) -> None:
    """HF-format export of the policy (+ tokenizer) into ``export_dir``; rank zero only.

    Full fine-tuning: ``save_pretrained`` (loads with ``AutoModelForCausalLM``). LoRA: the
    trained adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``;
    ``PeftModel.from_pretrained(base, export_dir)``), its ``base_model_name_or_path`` an
    absolute path or hub id; a base built from ``model.arch`` is saved to ``export_dir/base``.
    With ``model.lora.merge`` also ``export_dir/merged``: the base reloaded from disk in
    ``model.dtype`` (never 4-bit) with the exported adapter merged in, a plain transformers model.
    ``state_dict``: the full weights when the policy itself holds shards (FSDP; full fine-tuning
    only), see :func:`ptlight.runtime.strategy.full_module_state`. ``extras(dir)`` writes more files
    into the export (a method's reward or value head).

    Everything is written into a directory beside ``export_dir`` and renamed into place
    (:func:`ptlight.runtime.rundir.atomic_dir`): a full disk or a kill while writing leaves the
    previous export (or none), never a config.json without its weights.
    """
    with atomic_dir(export_dir) as staging:
        peft_model = peft_wrapper(policy)
        if peft_model is None:
            policy.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        else:
            config = peft_model.peft_config[TRAINED_ADAPTER]
            config.base_model_name_or_path, base_now = _export_base(peft_model, staging,
                                                                    export_dir)
            peft_model.save_pretrained(staging, selected_adapters=[TRAINED_ADAPTER])
            if model_cfg.lora.merge:
                _export_merged(staging, base_now, model_cfg, tokenizer)
        tokenizer.save_pretrained(staging)
        if extras is not None:
            extras(staging)


def load_export(export_dir: Path, model_cfg: DictConfig) -> PreTrainedModel:
    """A full-model export read back (eval mode, ``model.dtype``): what rank 0 evaluates after
    FSDP training, whose own policy object holds only its shard."""
    model = AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch_dtype(model_cfg.dtype), local_files_only=True,
        trust_remote_code=model_cfg.trust_remote_code)
    return model.eval()


def _export_base(peft_model: PeftModel, staging: Path, export_dir: Path) -> tuple[str, str]:
    """The adapter's base as the export names it (hub id or absolute dir) and where it can be
    read now; writes ``base/`` into the export when the base was built from ``model.arch`` and
    so exists nowhere else (named by its final place, ``export_dir/base``)."""
    base = peft_model.peft_config[TRAINED_ADAPTER].base_model_name_or_path
    if base and Path(base).expanduser().is_dir():
        path = str(Path(base).expanduser().resolve())
        return path, path
    if base:
        return base, base
    bare = copy.deepcopy(peft_model).unload()  # adapter layers removed, base weights intact
    bare.save_pretrained(staging / "base", safe_serialization=True)
    return str((export_dir / "base").resolve()), str(staging / "base")


def _export_merged(export_dir: Path, base: str, model_cfg: DictConfig, tokenizer) -> None:
    model = _from_pretrained(AutoModelForCausalLM, base, "base model",
                             dtype=torch_dtype(model_cfg.dtype),
                             trust_remote_code=model_cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(export_dir)).merge_and_unload()
    merged.save_pretrained(export_dir / "merged", safe_serialization=True)
    tokenizer.save_pretrained(export_dir / "merged")
