"""A reward model: a causal-LM backbone plus a scalar head read at the last completion token.

The backbone is any ``AutoModelForCausalLM`` ptlight can build (LoRA included); only its
hidden states are used, so the export stays a plain causal-LM directory (``save_pretrained``:
for a reward model trained from an SFT model, that is the SFT architecture with new weights)
and the head is a file next to it:

- ``reward_head.safetensors``: ``weight`` ``[1, H]`` and ``bias`` ``[1]`` (fp32);
- ``reward_head.json``: ``{"format": "ptlight.reward_head/1", "hidden_size": H,
  "token": "last", "shift": s}``; ``shift`` was already subtracted from ``bias`` (rewards are
  centred so the validation completions have mean reward 0).

Loading it with plain ``transformers`` + ``safetensors``, no ptlight needed::

    base = AutoModel.from_pretrained(d)            # the backbone (lm_head is not needed)
    head = safetensors.torch.load_file(f"{d}/reward_head.safetensors")
    h = base(input_ids=ids, attention_mask=mask).last_hidden_state        # [B, T, H]
    last = mask.sum(1) - 1                                                  # right padding
    reward = h[torch.arange(len(ids)), last] @ head["weight"].T + head["bias"]

Why not ``AutoModelForSequenceClassification``: transformers has no sequence-classification
class for LFM2 (the default model family), and a head file works for every causal LM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ptlight.errors import ModelLoadError
from ptlight.engine.logps import backbone_hidden

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
HEAD_FORMAT = "ptlight.reward_head/1"


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last attended token of each right-padded row."""
    return attention_mask.long().sum(1) - 1


class RewardModel(torch.nn.Module):
    """``backbone`` (a causal LM) + ``score`` (``Linear(H, 1)``): one reward per sequence."""

    def __init__(self, backbone: PreTrainedModel, head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        if head is None:  # small init, as TRL's/HF's score heads (std = initializer_range)
            head = torch.nn.Linear(hidden, 1)
            torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(head.bias)
        self.score = head
        self.shift = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[R]`` rewards of right-padded rows, read at each row's last attended token."""
        h = backbone_hidden(self.backbone, input_ids, attention_mask)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, last_positions(attention_mask)]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def score_rows(self, rows: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int) -> torch.Tensor:
        """``[R]`` rewards of tokenized (prompt, completion) rows, right-padded in batches."""
        from ptlight.data.module import pad_rows

        device = self.score.weight.device
        out = []
        for i in range(0, len(rows), batch_size):
            batch = pad_rows(rows[i : i + batch_size], pad_id)
            out.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def center(self, mean_reward: float) -> None:
        """Shift the head so that rewards whose mean was ``mean_reward`` now average 0."""
        self.score.bias -= mean_reward
        self.shift += mean_reward

    def save_head(self, export_dir: Path, head: dict[str, torch.Tensor] | None = None) -> None:
        """``reward_head.safetensors`` + ``reward_head.json``; ``head``: the score head's full
        ``weight``/``bias`` when ``self.score`` holds a shard (FSDP), else read from it."""
        export_dir.mkdir(parents=True, exist_ok=True)
        head = dict(self.score.named_parameters()) if head is None else head
        save_file({"weight": head["weight"].detach().float().cpu().contiguous(),
                   "bias": head["bias"].detach().float().cpu().contiguous()},
                  str(export_dir / HEAD_WEIGHTS))
        (export_dir / HEAD_CONFIG).write_text(json.dumps(
            {"format": HEAD_FORMAT, "hidden_size": self.score.in_features, "token": "last",
             "shift": self.shift}, indent=2))


def load_head(path: str | Path) -> torch.nn.Linear:
    """The score head saved by :meth:`RewardModel.save_head` in ``path``."""
    path = Path(path)
    if not (path / HEAD_WEIGHTS).is_file():
        raise ModelLoadError(
            f"{str(path)!r} has no {HEAD_WEIGHTS}: not a ptlight reward model export. Train one "
            "with `python -m ptlight method=rm` and point at its run dir's export/"
        )
    tensors = load_file(str(path / HEAD_WEIGHTS))
    weight, bias = tensors["weight"], tensors["bias"]
    head = torch.nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def load_reward_model(path: str | Path, dtype: str = "float32") -> tuple[RewardModel, object]:
    """(reward model in eval mode, its tokenizer) from a reward-model export directory."""
    from ptlight.model.backbone import build_policy, load_tokenizer

    head = load_head(path)
    cfg = OmegaConf.create({"path": str(path), "tokenizer": None, "trust_remote_code": False,
                            "dtype": dtype, "disable_dropout": True, "arch": None})
    tokenizer = load_tokenizer(cfg)
    model = RewardModel(build_policy(cfg, tokenizer), head)
    model.eval().requires_grad_(False)
    return model, tokenizer
