"""Judges for AI feedback (``python -m ptlight.label``): they score the N completions of a prompt.

Two kinds, one interface (:meth:`Judge.score_group` -> one score per completion, higher =
better, plus per-prompt details for the output rows):

- :class:`RewardJudge`: any ``ptlight.rewards`` plugin — the task's ``gold`` reward, a trained
  ``reward_model`` export, or a third party's. Each completion is scored on its own.
- :class:`ConstitutionJudge`: a local Hugging Face causal LM prompted with a *constitution* (a
  list of principles from a YAML file, see ``conf/constitution/default.yaml``) to say which of
  two answers follows the principles better (Constitutional AI / RLAIF: Bai et al. 2022,
  arXiv 2212.08073; Lee et al. 2023, arXiv 2309.00267). Every pair of distinct completions is
  judged in **both orders** (A=x, B=y and A=y, B=x) to cancel position bias; the verdict of an
  order is the sign of logit("A") − logit("B") at the answer position (the first token of each
  label, as RLAIF reads the judge's token probabilities instead of parsing free text). When the
  two orders agree the pair has a winner, when they disagree it is a **tie**. A completion's
  score is its Copeland score: wins + ½·ties over the other completions.

Constitution file (YAML)::

    name: helpful-harmless          # optional, recorded in the output metadata
    preamble: You are a careful judge ...   # optional
    principles:                     # required: a non-empty list of strings
      - Refuse requests that would help someone hurt a person.
      - ...
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ptlight.errors import ConfigError
from ptlight.rewards import Text, build_reward, user_text

DEFAULT_QUESTION = ("Which answer follows the principles better? Reply with the letter of the "
                    "better answer only.")


@dataclass
class Constitution:
    principles: list[str]
    name: str = "constitution"
    preamble: str = "You judge two answers to the same request."
    question: str = DEFAULT_QUESTION
    source: str = ""

    def render(self, prompt: str, first: str, second: str, labels: tuple[str, str]) -> str:
        rules = "\n".join(f"{i}. {p}" for i, p in enumerate(self.principles, 1))
        return (f"{self.preamble}\nPrinciples:\n{rules}\n\nRequest: {prompt}\n\n"
                f"Answer {labels[0]}: {first}\n\nAnswer {labels[1]}: {second}\n\n{self.question}")


def load_constitution(path: str | Path) -> Constitution:
    """A :class:`Constitution` from a YAML file; a bad file is a :class:`ConfigError` naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"judge.constitution: no such file {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with a 'principles' list")
    principles = data.get("principles")
    if (not isinstance(principles, list) or not principles
            or not all(isinstance(x, str) and x.strip() for x in principles)):
        raise ConfigError(f"{p}: 'principles' must be a non-empty list of non-empty strings")
    unknown = sorted(set(data) - {"name", "preamble", "question", "principles"})
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; valid keys: name, preamble, "
                          "question, principles")
    for key in ("name", "preamble", "question"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{p}: {key!r} must be a string")
    kw = {k: data[k] for k in ("name", "preamble", "question") if k in data}
    return Constitution(principles=[x.strip() for x in principles], source=str(p), **kw)


def default_constitution_path() -> str:
    from ptlight.config import config_dir

    return str(Path(config_dir()) / "constitution" / "default.yaml")


@dataclass
class Judgement:
    """Scores of one prompt's completions (higher = better) and what the judge saw."""

    scores: list[float]
    details: dict[str, Any] = field(default_factory=dict)


class Judge:
    name = "judge"

    def score_groups(self, prompts: list[Text], groups: list[list[str]]) -> list[Judgement]:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name}


class RewardJudge(Judge):
    """A ``ptlight.rewards`` plugin as a judge: each completion gets its reward."""

    def __init__(self, spec: dict[str, Any], device: torch.device) -> None:
        self.spec = dict(spec)
        self.name = self.spec["name"]
        self.reward = build_reward(self.spec, key="judge").to(device)

    def score_groups(self, prompts: list[Text], groups: list[list[str]]) -> list[Judgement]:
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        flat_c = [c for g in groups for c in g]
        scores = self.reward(flat_p, flat_c).tolist()
        out, i = [], 0
        for g in groups:
            out.append(Judgement(scores[i : i + len(g)]))
            i += len(g)
        return out

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "reward", "spec": self.spec}


class ConstitutionJudge(Judge):
    """A causal LM prompted with a constitution; pairwise verdicts in both orders (module doc)."""

    name = "constitution"

    def __init__(self, *, path: str | None, constitution: str | None, device: torch.device,
                 model_cfg: Any, batch_size: int = 16, max_length: int = 1024,
                 labels: tuple[str, str] = ("A", "B")) -> None:
        if not path:
            raise ConfigError("judge.path is not set: the constitution judge needs a local "
                              "Hugging Face causal LM dir (or hub id) as judge.path")
        from omegaconf import OmegaConf

        from ptlight.model.backbone import build_policy, load_tokenizer
        from ptlight.runtime.validate import whole_number

        whole_number(batch_size, "judge.batch_size", 1, "judge prompts scored at once")
        whole_number(max_length, "judge.max_length", 2, "judge prompt tokens at most")
        self.constitution = load_constitution(constitution or default_constitution_path())
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        # the policy's model settings (dtype, trust_remote_code) with the judge's weights
        model_cfg = OmegaConf.merge(model_cfg, {"path": path, "tokenizer": None,
                                                "lora": {"enabled": False, "quantize": None}})
        self.tokenizer = load_tokenizer(model_cfg)
        self.model = build_policy(model_cfg, self.tokenizer).to(device).eval()
        if len(labels) != 2 or labels[0] == labels[1]:
            raise ConfigError(f"judge.labels={list(labels)}: two different labels, e.g. [A, B]")
        self.labels = tuple(labels)
        ids = [self.tokenizer(lbl, add_special_tokens=False).input_ids for lbl in labels]
        if any(not i for i in ids) or ids[0][0] == ids[1][0]:
            raise ConfigError(f"judge.labels={list(labels)}: their first tokens must differ "
                              f"under the judge's tokenizer (got {ids})")
        self.label_ids = (ids[0][0], ids[1][0])
        self.device = device

    def _encode(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False).input_ids
        return ids[-self.max_length:]  # keep the end: the answers and the question

    @torch.no_grad()
    def first_minus_second(self, texts: list[str]) -> list[float]:
        """logit(label A) − logit(label B) at the answer position of each rendered prompt."""
        from ptlight.data.module import left_pad

        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = [self._encode(t) for t in texts[i : i + self.batch_size]]
            batch = left_pad(enc, self.tokenizer.pad_token_id)
            attn = batch["attention_mask"].to(self.device)
            pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=attn, position_ids=pos).logits[:, -1].float()
            out.extend((logits[:, self.label_ids[0]] - logits[:, self.label_ids[1]]).tolist())
        return out

    def score_groups(self, prompts: list[Text], groups: list[list[str]]) -> list[Judgement]:
        jobs = []  # (group index, i, j): completion i as A, j as B, then j as A, i as B
        texts = []
        for g, (prompt, comps) in enumerate(zip(prompts, groups)):
            question = user_text(prompt)
            for i, j in itertools.combinations(range(len(comps)), 2):
                jobs.append((g, i, j))
                texts.append(self.constitution.render(question, comps[i], comps[j], self.labels))
                texts.append(self.constitution.render(question, comps[j], comps[i], self.labels))
        margins = self.first_minus_second(texts) if texts else []
        judgements = [Judgement([0.0] * len(c), {"comparisons": []}) for c in groups]
        for k, (g, i, j) in enumerate(jobs):
            fwd, bwd = margins[2 * k], margins[2 * k + 1]
            verdict = pair_verdict(fwd, bwd)
            scores = judgements[g].scores
            if verdict == "tie":
                scores[i] += 0.5
                scores[j] += 0.5
            else:
                scores[i if verdict == "first" else j] += 1.0
            judgements[g].details["comparisons"].append(
                {"i": i, "j": j, "margin_ij": round(fwd, 4), "margin_ji": round(bwd, 4),
                 "verdict": {"first": i, "second": j, "tie": "tie"}[verdict]})
        return judgements

    def metadata(self) -> dict[str, Any]:
        c = self.constitution
        return {"name": self.name, "kind": "llm", "path": self.path, "labels": list(self.labels),
                "constitution": {"name": c.name, "source": c.source, "preamble": c.preamble,
                                 "principles": c.principles, "question": c.question},
                "orders": "both (A/B swapped); disagreement = tie"}


def pair_verdict(margin_first_as_a: float, margin_first_as_b: float) -> str:
    """``"first"``, ``"second"`` or ``"tie"`` from the two orders' logit(A) − logit(B).

    Order 1 shows the first completion as A: it wins there when the margin is > 0. Order 2
    shows it as B: it wins there when the margin is < 0. Agreement gives the winner; a judge
    that always says "A" (pure position bias) disagrees with itself, which is a tie.
    """
    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    order1, order2 = sign(margin_first_as_a), -sign(margin_first_as_b)  # +1: first wins
    if order1 == order2 != 0:
        return "first" if order1 > 0 else "second"
    return "tie"


def build_judge(spec: dict[str, Any], device: torch.device, model_cfg: Any = None) -> Judge:
    """``spec["name"] == "constitution"``: the LLM judge (loaded with ``model_cfg``'s settings
    and ``spec["path"]``'s weights); anything else: a reward plugin."""
    spec = dict(spec)
    if spec.get("name") == "constitution":
        spec.pop("name")
        valid = {"path", "constitution", "batch_size", "max_length", "labels"}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ConfigError(f"judge 'constitution' has no setting(s) "
                              f"{', '.join('judge.' + k for k in unknown)}; valid keys: "
                              f"{', '.join(sorted(valid))}")
        labels = tuple(spec.pop("labels", ("A", "B")))
        return ConstitutionJudge(device=device, labels=labels, model_cfg=model_cfg,
                                 path=spec.pop("path", None),
                                 constitution=spec.pop("constitution", None), **spec)
    return RewardJudge(spec, device)
