"""A task made of files: held-out prompts plus reward plugins, no code.

``data.task`` takes, besides a registered task's name, a task spec — inline or as a YAML/JSON
file::

    # my_task.yaml
    name: reverse                    # shown in reports (default: the file's name)
    heldout: heldout.jsonl           # rows {"prompt": ..., "reference": ... (optional)};
                                     # relative paths are relative to this file
    rewards:                         # one or more ptlight.rewards plugins; the gold reward is
      - {name: reverse, weight: 1.0} # the weighted sum of their scores
    threshold: 1.0                   # exact match: gold reward >= threshold; null: no exact

    python -m ptlight method=sft data.path=train.jsonl data.task=my_task.yaml

Such a task evaluates exactly like a bundled one (the before/after table, validation samples,
``val/gold/*``, ``python -m ptlight.eval``, reports and the model card); it has no training
rows of its own, so training data comes from ``data.path``. A prompt is kept as the file gives
it: a string is rendered as plain text, as training renders string prompts; a message list
through the chat template. Rewards see the prompts in that form, as during PPO.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptlight.errors import ConfigError, DataError, PluginError

SPEC_KEYS = ("name", "heldout", "rewards", "threshold")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def is_spec_file(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(SPEC_SUFFIXES)


def load_spec(value: Any, key: str = "data.task") -> dict[str, Any]:
    """The task spec of ``value``: a mapping, or a path to a YAML/JSON file holding one (its
    relative ``heldout`` path is then resolved against the file's directory)."""
    base = Path.cwd()
    if is_spec_file(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={value!r}: no such task file (relative to {Path.cwd()})")
        from omegaconf import OmegaConf

        try:
            spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as exc:
            raise ConfigError(f"{key}={value!r}: not a YAML/JSON task spec: {exc}") from exc
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}={value!r}: the file must hold a mapping with keys "
                              f"{', '.join(SPEC_KEYS)}")
        spec.setdefault("name", path.stem)
        base = path.resolve().parent
    elif isinstance(value, dict):
        spec = dict(value)
    else:
        raise ConfigError(f"{key}={value!r}: a task name, a task file (.yaml/.json) or a "
                          f"mapping with {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; a task spec has "
                          f"{', '.join(SPEC_KEYS)}")
    if not spec.get("heldout"):
        raise ConfigError(f"{key}.heldout is not set: a file of held-out prompts (JSONL rows "
                          "with 'prompt' and an optional 'reference')")
    heldout = Path(str(spec["heldout"])).expanduser()
    spec["heldout"] = str(heldout if heldout.is_absolute() else base / heldout)
    rewards = spec.get("rewards")
    if isinstance(rewards, dict):
        rewards = [rewards]
    if not rewards or not all(isinstance(r, dict) and r.get("name") for r in rewards):
        raise ConfigError(f"{key}.rewards: a list of reward plugin specs, each with a name "
                          "(e.g. [{name: my_reward, weight: 1.0}]); python -m ptlight.rewards "
                          "lists the installed ones")
    spec["rewards"] = rewards
    threshold = spec.get("threshold", 1.0)
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))):
        raise ConfigError(f"{key}.threshold={threshold!r}: a number (exact match: gold reward "
                          ">= threshold) or null")
    spec["threshold"] = threshold
    spec.setdefault("name", Path(spec["heldout"]).stem)
    return spec


class FileTask:
    """A task built from a spec (:func:`load_spec`): held-out prompts from a file, the gold
    reward from reward plugins."""

    kinds = ("prompt",)

    def __init__(self, spec: dict[str, Any], key: str = "data.task") -> None:
        from ptlight.rewards import build_reward

        self.spec = spec
        self.name = str(spec["name"])
        self.threshold = spec["threshold"]
        self.rows = self._read(spec["heldout"])
        self.rewards = []
        for i, r in enumerate(spec["rewards"]):
            r = dict(r)
            weight = r.pop("weight", 1.0)
            self.rewards.append((float(weight), build_reward(r, key=f"{key}.rewards[{i}]")))

    @staticmethod
    def _read(path: str) -> list[dict[str, Any]]:
        from ptlight.data.module import load_rows

        if not Path(path).is_file():
            raise ConfigError(f"task held-out prompts {path!r}: no such file")
        rows = load_rows(path)
        out = []
        for i, row in enumerate(rows):
            prompt, ref = row.get("prompt"), row.get("reference")
            ok = (isinstance(prompt, str) and prompt.strip()) or (
                isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                    for m in prompt))
            if not ok:
                raise DataError(f"{path}, row {i}: 'prompt' must be a non-empty string or a "
                                "list of {role, content} messages")
            if ref is not None and not isinstance(ref, str):
                raise DataError(f"{path}, row {i}: 'reference' must be a string (or absent)")
            out.append({"prompt": prompt, "reference": ref})
        if not out:
            raise DataError(f"{path}: no held-out prompts")
        return out

    def to(self, device: Any) -> FileTask:
        for _, reward in self.rewards:
            reward.to(device)
        return self

    # ---- the task contract ------------------------------------------------------------------
    def make_rows(self, kind: str, n: int, seed: int, split: str, **_: Any) -> list[dict]:
        """The first ``n`` held-out prompts (``kind="prompt"``, ``split="heldout"``); a file
        task has no training rows (those come from ``data.path``)."""
        if kind != "prompt" or split != "heldout":
            raise ConfigError(f"task {self.name!r} is made of files: it holds held-out prompts "
                              f"only, not {kind!r} rows for {split!r}; give training data with "
                              "data.path")
        return [{"prompt": r["prompt"]} for r in self.rows[:n]]

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        """The gold reward of each completion: the weighted sum of the reward plugins."""
        total = [0.0] * len(completions)
        for weight, reward in self.rewards:
            values = reward(list(prompts), list(completions)).tolist()  # checked: count, NaN
            total = [t + weight * v for t, v in zip(total, values)]
        for value in total:
            if not math.isfinite(value):
                raise PluginError(f"task {self.name!r}: a reward plugin returned a non-finite "
                                  "score")
        return total

    def gold_reward(self, prompt: Any, completion: str) -> float:
        return self.score([prompt], [completion])[0]

    def reference_answer(self, prompt: Any) -> str | None:
        for row in self.rows:
            if row["prompt"] == prompt or _user(row["prompt"]) == prompt:
                return row["reference"]
        return None

    def describe(self) -> str:
        return json.dumps({k: self.spec[k] for k in SPEC_KEYS if k in self.spec})


def _user(prompt: Any) -> str:
    from ptlight.rewards import user_text

    return user_text(prompt)
