"""The rows ``python -m ptlight.feedback`` writes, built from checked feedback events
(:class:`ptlight.feedback.Event`): unpaired (KTO), pairwise, listwise and held-out rows, and the
label balance with the KTO weights it suggests. The rules are in :mod:`ptlight.feedback`'s
docstring."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ptlight.eval.acceptance import edit_distance

if TYPE_CHECKING:
    from ptlight.feedback import Event


def _as_completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _meta(e: Event, source: str) -> dict[str, Any]:
    return {"source": source, "user": e.user, "session": e.session, "row": e.row}


def pairs(events: list[Event], cfg: DictConfig, skipped: Counter) -> list[dict[str, Any]]:
    """Pairwise rows from edits, choices and (``pairs_from_ratings``) rated responses."""
    out: list[dict[str, Any]] = []
    rated: dict[str, dict[bool, list[Event]]] = defaultdict(lambda: {True: [], False: []})
    for e in events:
        p = e.prompt
        if e.edited is not None:
            dist = edit_distance(e.response, e.edited)
            if dist < cfg.min_edit:
                skipped[f"edit below feedback.min_edit={cfg.min_edit}"] += 1
            else:
                out.append({"prompt": p, "chosen": _as_completion(p, e.edited),
                            "rejected": _as_completion(p, e.response),
                            "edit_distance": round(dist, 4), **_meta(e, "edit")})
        if e.choice is not None:
            out += [{"prompt": p, "chosen": _as_completion(p, e.responses[e.choice]),
                     "rejected": _as_completion(p, r), **_meta(e, "choice")}
                    for j, r in enumerate(e.responses) if j != e.choice]
        if e.rating is not None and all(x.response != e.response for x in rated[e.key][e.rating]):
            rated[e.key][e.rating].append(e)
    if cfg.pairs_from_ratings:
        for by_label in rated.values():
            for up, down in zip(by_label[True], by_label[False]):
                out.append({"prompt": up.prompt, "chosen": _as_completion(up.prompt, up.response),
                            "rejected": _as_completion(up.prompt, down.response),
                            **_meta(up, "ratings"), "rejected_row": down.row})
    return out


def unpaired(events: list[Event], pair_rows: list[dict[str, Any]], from_pairs: bool
             ) -> list[dict[str, Any]]:
    """KTO rows: every rating; with ``from_pairs`` each edit/choice pair's two sides."""
    out = [{"prompt": e.prompt, "completion": _as_completion(e.prompt, e.response),
            "label": e.rating, **_meta(e, "rating")} for e in events if e.rating is not None]
    if from_pairs:
        for r in pair_rows:
            if r["source"] in ("edit", "choice"):
                meta = {k: r[k] for k in ("source", "user", "session", "row")}
                out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True, **meta},
                        {"prompt": r["prompt"], "completion": r["rejected"], "label": False,
                         **meta}]
    return out


def listwise(events: list[Event], min_k: int) -> list[dict[str, Any]]:
    """A prompt's distinct rated responses (>= ``min_k``, both labels), scored by their share
    of up ratings."""
    votes: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[str, Any] = {}
    for e in events:
        if e.rating is not None:
            votes[e.key][e.response].append(e.rating)
            prompts[e.key] = e.prompt
    out = []
    for key, by_response in votes.items():
        labels = {r for rs in by_response.values() for r in rs}
        if len(by_response) >= min_k and len(labels) == 2:
            p = prompts[key]
            out.append({"prompt": p, "completions": [_as_completion(p, t) for t in by_response],
                        "scores": [sum(v) / len(v) for v in by_response.values()],
                        "source": "ratings"})
    return out


def balance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Label counts and KTO weights that make desirable_weight x #desirable equal
    undesirable_weight x #undesirable (the minority label weighted up)."""
    n_d = sum(r["label"] for r in rows)
    n_u = len(rows) - n_d
    out: dict[str, Any] = {"desirable": n_d, "undesirable": n_u,
                           "desirable_share": n_d / len(rows) if rows else None}
    if n_d and n_u:
        w_d, w_u = (1.0, round(n_d / n_u, 3)) if n_d >= n_u else (round(n_u / n_d, 3), 1.0)
        out["suggested"] = {"desirable_weight": w_d, "undesirable_weight": w_u,
                            "override": f"method.objective.desirable_weight={w_d} "
                                        f"method.objective.undesirable_weight={w_u}"}
    return out


def downsample(rows: list[dict[str, Any]], rng: random.Random) -> tuple[list, int]:
    """Drop seeded majority-label rows down to the minority's count; returns rows and drops."""
    by_label = {lab: [i for i, r in enumerate(rows) if r["label"] is lab] for lab in (True, False)}
    small, big = sorted(by_label.values(), key=len)
    keep = set(small) | set(rng.sample(big, len(small)))
    return [r for i, r in enumerate(rows) if i in keep], len(rows) - len(keep)


def heldout_rows(events: list[Event]) -> list[dict[str, Any]]:
    """One row per held-out prompt: ``prompt``, ``reference`` (edited text, else an up-rated
    or chosen response), ``logged_acceptance`` (share of its ratings that were up)."""
    by_prompt: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_prompt[e.key].append(e)
    out = []
    for evs in by_prompt.values():
        refs = ([e.edited for e in evs if e.edited is not None]
                + [e.response for e in evs if e.rating]
                + [e.responses[e.choice] for e in evs if e.choice is not None])
        ratings = [e.rating for e in evs if e.rating is not None]
        row: dict[str, Any] = {"prompt": evs[0].prompt, "num_events": len(evs),
                               "logged_acceptance": sum(ratings) / len(ratings) if ratings
                               else None}
        if refs:
            row["reference"] = refs[0]
        out.append(row)
    return out
