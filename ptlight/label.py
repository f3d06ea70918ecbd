"""``python -m ptlight.label``: AI feedback (RLAIF) and Self-Instruct prompt growth, as its own
Hydra app (``conf/label.yaml``; it reads the ``model``, ``data`` and ``judge`` groups).

    python -m ptlight.label model.path=SFT_EXPORT                          # gold judge, pairwise
    python -m ptlight.label model.path=SFT judge=reward_model judge.path=RM label.format=listwise
    python -m ptlight.label model.path=SFT judge=constitution judge.path=JUDGE_LM \\
        judge.constitution=my_principles.yaml
    python -m ptlight.label model.path=SFT data.path=prompts.jsonl data.task=null judge=...
    python -m ptlight.label label.mode=prompts model.path=SFT self_instruct.num_new=200
    python -m ptlight method=dpo model.path=SFT data.path=<run dir>/pairwise.jsonl

**Preferences** (``label.mode=preferences``): take ``label.num_prompts`` prompts (the ``prompt``
column of ``data.path``, else train prompts of the bundled ``data.task``), sample
``label.num_completions`` completions of each from the policy (``model.*``, at
``label.temperature``, seeded by ``seed``), score them with the judge (:mod:`ptlight.eval.judges`: a
reward plugin such as ``gold`` or a trained ``reward_model``, or the constitution LLM judge) and
write, as JSON Lines that ``datasets.load_dataset("json", ...)`` and ``data.path=`` read:

- ``label.format=pairwise``: ``prompt``, ``chosen`` (the best-scored completion), ``rejected``
  (the worst), ``chosen_score``, ``rejected_score``, ``judge`` (+ ``comparisons`` for the LLM
  judge: every pair's margins in both orders and its verdict). A prompt whose completions all
  score the same (or are all the same text) carries no preference and is skipped (counted).
- ``label.format=listwise``: ``prompt``, ``completions`` (all N, sampled order), ``scores`` (the
  judge's; ties allowed), ``judge`` (+ ``comparisons``). All-tied prompts are skipped.

Completions are message lists when the prompt is (``[{"role": "assistant", ...}]``), strings
otherwise. A prompt with an empty completion is skipped (counted): empty texts are bad rows.

``label.json`` beside the data holds the judge metadata (name, settings, the constitution and
its principles for the LLM judge), the policy, sampling settings, counts, wall time and — when
``data.task`` has a gold reward — the **gold check**: how often the judge's chosen completion
has a strictly higher gold reward than the rejected one (``agreement``), equal (``tie``) or lower
(``disagreement``), and the mean gold reward of chosen, rejected and all samples. For listwise
data the same is counted over every pair the judge orders strictly.

**Prompts** (``label.mode=prompts``, Self-Instruct, Wang et al. 2022, arXiv 2212.10560): start from
seed prompts (``self_instruct.seeds``, or the first ``num_seeds`` prompts of ``data.*``); each
round shows the policy ``examples_per_query`` prompts drawn from the pool (seeds and prompts
kept so far) and asks for a new one; the first line of each sample is a candidate. Candidates
are kept when they have ``min_words``..``max_words`` words and their token-sequence similarity
(``difflib.SequenceMatcher`` ratio over words, the stand-in for Self-Instruct's ROUGE-L filter)
to every kept prompt is below ``self_instruct.similarity``; exact duplicates always go. Output:
``prompts.jsonl`` (``prompt`` as a user message list, ``source`` seed | self_instruct,
``round``) — prompt-only data for PPO or for the next labelling round — and ``label.json``
with the filter counts (and, with ``data.task``, how many new prompts the task's gold reward
can score).

Errors the user can fix (a bad key, a missing judge path, a bad prompt row naming file and row)
exit with status 2 and one line.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ptlight.config import config_dir, register_resolvers, resolve_device
from ptlight.errors import ConfigError, DataError
from ptlight.runtime.app import or_exit, run_dir
from ptlight.runtime.validate import whole_number
from ptlight.tasks import task_label

register_resolvers()


def _device(name: str):
    return resolve_device(name, "label.device")


def load_prompts(cfg: DictConfig, n: int) -> list[Any]:
    """``n`` prompts: the first ``n`` rows of ``data.path`` (``prompt`` column, checked as
    prompt-only rows), else ``n`` train prompts of ``data.task``."""
    from ptlight.data.shapes import BadRow, parse_examples

    if cfg.data.path is None:
        if not cfg.data.task:
            raise ConfigError("no prompts: set data.path (a file with a 'prompt' column) or "
                              "data.task (a task that generates prompts)")
        from ptlight.tasks import resolve_task

        task = resolve_task(cfg.data.task, args=cfg.data.get("task_args"))
        assert task is not None
        return [r["prompt"] for r in task.make_rows("prompt", n, cfg.data.seed, "train",
                                                    **cfg.data.task_args)]
    from ptlight.data.module import load_rows

    prompts = []
    for i, row in enumerate(load_rows(cfg.data.path)[:n]):
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object with named columns, got {type(row).__name__}")
            prompts.append(parse_examples(row, "prompt")[0].prompt)
        except BadRow as exc:
            raise DataError(f"{cfg.data.path}, row {i}: {exc}") from None
    if not prompts:
        raise DataError(f"{cfg.data.path}: no prompts")
    return prompts


def _as_completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _gold(cfg: DictConfig):
    """The task's gold reward function, or None (no task / not the task's prompts)."""
    if not cfg.data.task:
        return None
    from ptlight.tasks import resolve_task

    task = resolve_task(cfg.data.task, args=cfg.data.get("task_args"))
    assert task is not None
    return lambda prompt, completion: task.score([prompt], [completion])[0]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def gold_check(pairs: list[tuple[float, float]], all_gold: list[float]) -> dict[str, Any]:
    """Agreement of judged (chosen, rejected) pairs with the gold reward (see module doc)."""
    n = len(pairs)
    if not n:
        return {"num_pairs": 0}
    agree = sum(c > r for c, r in pairs)
    tie = sum(c == r for c, r in pairs)
    return {"num_pairs": n, "agreement": agree / n, "tie": tie / n,
            "disagreement": (n - agree - tie) / n,
            "gold/chosen": _mean([c for c, _ in pairs]),
            "gold/rejected": _mean([r for _, r in pairs]), "gold/samples": _mean(all_gold)}


def label_preferences(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Sample, judge and write the preference data set (module doc); returns the metadata."""
    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.eval.gold import generate
    from ptlight.eval.judges import build_judge
    from ptlight.rewards import user_text

    lab = cfg.label
    if lab.format not in ("pairwise", "listwise"):
        raise ConfigError(f"label.format={lab.format!r}; use pairwise or listwise")
    if lab.num_completions < 2:
        raise ConfigError(f"label.num_completions={lab.num_completions}: a preference needs "
                          "at least 2 completions per prompt")
    if lab.temperature <= 0:
        raise ConfigError("label.temperature must be > 0 (completions are sampled)")
    whole_number(lab.num_prompts, "label.num_prompts", 1, "prompts to label")
    whole_number(lab.max_new_tokens, "label.max_new_tokens", 1,
                 "tokens generated per completion at most")
    whole_number(lab.batch_size, "label.batch_size", 1, "prompts generated for at once")
    started = time.time()
    device = _device(lab.device)
    prompts = load_prompts(cfg, lab.num_prompts)
    judge = build_judge(OmegaConf.to_container(cfg.judge, resolve=True), device, cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tokenizer).to(device)
    n = lab.num_completions
    texts = generate(policy, tokenizer, [p for p in prompts for _ in range(n)],
                     max_new_tokens=lab.max_new_tokens, batch_size=lab.batch_size,
                     do_sample=True, temperature=lab.temperature, seed=cfg.seed,
                     description="sampling completions")
    groups = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    sampled_s = time.time() - started
    judgements = judge.score_groups(prompts, groups)
    gold = _gold(cfg)
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    gold_pairs: list[tuple[float, float]] = []
    all_gold: list[float] = []
    for prompt, comps, jd in zip(prompts, groups, judgements):
        g = [gold(user_text(prompt), c) for c in comps] if gold else None
        if g:
            all_gold.extend(g)
        if any(not c.strip() for c in comps):
            skipped["an empty completion"] += 1
            continue
        s = jd.scores
        if max(s) == min(s) or len(set(comps)) == 1:
            skipped["all completions scored the same (no preference)"] += 1
            continue
        extra = {"judge": judge.name, **jd.details}
        if lab.format == "pairwise":
            best = max(range(n), key=lambda i: s[i])
            worst = min(range(n), key=lambda i: s[i])
            rows.append({"prompt": prompt, "chosen": _as_completion(prompt, comps[best]),
                         "rejected": _as_completion(prompt, comps[worst]),
                         "chosen_score": s[best], "rejected_score": s[worst], **extra})
            if g:
                gold_pairs.append((g[best], g[worst]))
        else:
            rows.append({"prompt": prompt, "completions": [_as_completion(prompt, c) for c in comps],
                         "scores": list(s), **extra})
            if g:
                gold_pairs += [(g[i], g[j]) if s[i] > s[j] else (g[j], g[i])
                               for i in range(n) for j in range(i + 1, n) if s[i] != s[j]]
    out = Path(lab.output) if lab.output else run_dir / f"{lab.format}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {
        "mode": "preferences", "output": str(out), "format": lab.format,
        "judge": judge.metadata(), "policy": cfg.model.path or "model.arch (untrained)",
        "prompts": cfg.data.path or f"task {task_label(cfg.data.task)!r} (train split)",
        "num_prompts": len(prompts), "num_completions": n, "temperature": lab.temperature,
        "max_new_tokens": lab.max_new_tokens, "seed": cfg.seed, "rows": len(rows),
        "skipped": dict(skipped), "sampling_time_s": round(sampled_s, 1),
        "wall_time_s": round(time.time() - started, 1),
    }
    comparisons = [c for jd in judgements for c in jd.details.get("comparisons", [])]
    if comparisons:  # the LLM judge: how often each order said "A", how often they disagreed
        n_c = len(comparisons)
        meta["judge_stats"] = {
            "comparisons": n_c, "tie_rate": sum(c["verdict"] == "tie" for c in comparisons) / n_c,
            "order1_says_A": sum(c["margin_ij"] > 0 for c in comparisons) / n_c,
            "order2_says_A": sum(c["margin_ji"] > 0 for c in comparisons) / n_c}
    if gold:
        meta["gold_check"] = {"task": task_label(cfg.data.task),
                              **gold_check(gold_pairs, all_gold)}
    (out.parent / "label.json").write_text(json.dumps(meta, indent=2))
    if not rows:
        raise DataError(f"no preference rows: every prompt was skipped ({dict(skipped)}; "
                        f"details in {out.parent / 'label.json'}); raise "
                        "label.num_completions or label.temperature, or check the judge")
    return meta


_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")


def _candidate(text: str) -> str:
    """The first non-empty line of a sample, without list numbering."""
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip()
        if line:
            return line
    return ""


def similarity(a: str, b: str) -> float:
    """Token-sequence similarity in [0, 1] (``difflib`` ratio over lower-cased words)."""
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio()


def self_instruct_request(examples: list[str]) -> str:
    shown = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
    return (f"Here are some example requests:\n{shown}\n"
            "Write one new request of the same kind, different from these.")


def grow_prompts(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Self-Instruct prompt growth (module doc); returns the metadata."""
    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.eval.gold import generate
    from ptlight.rewards import user_text

    si, lab = cfg.self_instruct, cfg.label
    if si.examples_per_query < 1 or si.num_new < 1 or si.batch_size < 1:
        raise ConfigError("self_instruct.examples_per_query, num_new and batch_size must be >= 1")
    if not 0 < si.similarity <= 1:
        raise ConfigError(f"self_instruct.similarity={si.similarity}: use a value in (0, 1]")
    whole_number(lab.max_new_tokens, "label.max_new_tokens", 1,
                 "tokens generated per request at most")
    whole_number(lab.batch_size, "label.batch_size", 1, "requests generated for at once")
    started = time.time()
    if si.seeds:
        seeds = [str(s).strip() for s in si.seeds]
        if any(not s for s in seeds):
            raise ConfigError("self_instruct.seeds has an empty prompt")
    else:
        seeds = [user_text(p) for p in load_prompts(cfg, si.num_seeds)]
    device = _device(lab.device)
    tokenizer = load_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tokenizer).to(device)
    rng = random.Random(f"self-instruct-{cfg.seed}")
    kept: list[dict[str, Any]] = []
    pool = list(dict.fromkeys(seeds))
    reasons: Counter[str] = Counter()
    rounds = 0
    while len(kept) < si.num_new and rounds < si.max_rounds:
        rounds += 1
        requests = [[{"role": "user", "content": self_instruct_request(
            rng.sample(pool, min(si.examples_per_query, len(pool))))}]
            for _ in range(si.batch_size)]
        samples = generate(policy, tokenizer, requests, max_new_tokens=lab.max_new_tokens,
                           batch_size=lab.batch_size, do_sample=True,
                           temperature=lab.temperature, seed=cfg.seed + rounds,
                           description=f"self-instruct round {rounds}")
        for text in samples:
            cand = _candidate(text)
            words = len(cand.split())
            if not si.min_words <= words <= si.max_words:
                reasons["length"] += 1
            elif any(cand.lower() == p.lower() for p in pool):
                reasons["duplicate"] += 1
            elif max(similarity(cand, p) for p in pool) >= si.similarity:
                reasons["too similar"] += 1
            elif len(kept) < si.num_new:
                pool.append(cand)
                kept.append({"prompt": [{"role": "user", "content": cand}],
                             "source": "self_instruct", "round": rounds})
                reasons["kept"] += 1
    rows = [{"prompt": [{"role": "user", "content": s}], "source": "seed", "round": 0}
            for s in dict.fromkeys(seeds)] + kept
    out = Path(lab.output) if lab.output else run_dir / "prompts.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta: dict[str, Any] = {
        "mode": "prompts", "output": str(out), "policy": cfg.model.path or "model.arch (untrained)",
        "num_seeds": len(set(seeds)), "num_new": len(kept), "rounds": rounds,
        "candidates": dict(reasons), "settings": OmegaConf.to_container(si, resolve=True),
        "wall_time_s": round(time.time() - started, 1),
    }
    gold = _gold(cfg)
    if gold and kept:
        def scorable(text: str) -> bool:
            try:
                gold(text, "")
                return True
            except ValueError:
                return False
        meta["task_valid"] = sum(scorable(r["prompt"][0]["content"]) for r in kept) / len(kept)
    (out.parent / "label.json").write_text(json.dumps(meta, indent=2))
    return meta


def run_label(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.label.mode == "preferences":
        return label_preferences(cfg, run_dir)
    if cfg.label.mode == "prompts":
        return grow_prompts(cfg, run_dir)
    raise ConfigError(f"label.mode={cfg.label.mode!r}; use preferences or prompts")


def _print_summary(meta: dict[str, Any]) -> None:
    if meta["mode"] == "preferences":
        print(f"wrote {meta['rows']} {meta['format']} rows to {meta['output']} (judge "
              f"{meta['judge']['name']!r}; skipped {sum(meta['skipped'].values())}); "
              f"metadata in label.json")
        check = meta.get("gold_check")
        if check and check.get("num_pairs"):
            print(f"gold check on {check['num_pairs']} judged pairs: agreement "
                  f"{check['agreement']:.3f}, tie {check['tie']:.3f}, disagreement "
                  f"{check['disagreement']:.3f}; gold reward chosen {check['gold/chosen']:.3f} "
                  f"vs rejected {check['gold/rejected']:.3f} (all samples "
                  f"{check['gold/samples']:.3f})")
    else:
        print(f"wrote {meta['num_seeds']} seed + {meta['num_new']} new prompts to "
              f"{meta['output']} in {meta['rounds']} round(s); candidates {meta['candidates']}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="label")
def _app(cfg: DictConfig) -> None:
    _print_summary(or_exit("ptlight.label", run_label, cfg, run_dir()))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
