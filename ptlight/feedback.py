"""``python -m ptlight.feedback``: product feedback logs -> training data, with the data-quality
checks that decide whether preference tuning on them helps (``conf/feedback.yaml``).

    python -m ptlight.feedback feedback.path=feedback.jsonl feedback.holdout=0.1
    python -m ptlight method=kto model.path=SFT data.path=<run dir>/unpaired.jsonl data.task=null
    python -m ptlight method=dpo model.path=SFT data.path=<run dir>/pairwise.jsonl data.task=null
    python -m ptlight.eval model.path=KTO eval.baseline=SFT eval.acceptance.path=<run dir>/heldout.jsonl

**The log** (JSON Lines, JSON, Parquet or CSV through ``datasets``; one event per row):
``prompt`` (a string or a message list: the conversation so far) or ``conversation``, and

- ``response`` + ``rating``: a thumbs up/down (values from ``feedback.ratings.up``/``down``,
  compared lower-cased; ``true``/``false`` and ``1``/``0`` are in the default lists);
- ``response`` + ``edited``: the user's edited version of the response;
- ``responses`` (a list, >= 2) + ``choice`` (the index of the one the user picked, or its text);

optionally ``user`` (or ``user_id``), ``session`` (or ``session_id``) and ``timestamp`` (ISO
8601 text, epoch seconds, or a datetime). A row may carry a rating and an edit together (a thumbs
down, then the fix); each gives its rows. Responses are strings or assistant message lists.

**What it writes** (``feedback.output_dir``, else the run dir), as ``data.path=`` reads them:

- ``unpaired.jsonl`` (KTO): ``prompt``, ``completion``, ``label`` from every rating; with
  ``feedback.unpaired_from_pairs`` also from every pair below (the better response desirable,
  the worse undesirable: the conversion TRL applies to pairwise data for KTO).
- ``pairwise.jsonl`` (DPO): ``prompt``, ``chosen``, ``rejected`` from edits (edited > original,
  only when their word-level normalised edit distance, :func:`ptlight.eval.acceptance.edit_distance`,
  is >= ``feedback.min_edit``; smaller edits are typo fixes and are skipped, counted), from
  choices (the pick > each other response) and, with ``feedback.pairs_from_ratings``, from a
  prompt's up- and down-rated responses (zipped: each response in at most one such pair).
- ``listwise.jsonl``: a prompt with >= ``feedback.listwise_min`` distinct rated responses of
  both labels: ``completions`` and ``scores`` (each response's share of up ratings; ties allowed).
- ``heldout.jsonl`` with ``feedback.holdout`` > 0: the newest prompts (by their first event's
  ``timestamp``, else row order), kept out of every training file: ``prompt``, ``reference``
  (the edited text, else an up-rated or chosen response; absent when the users accepted
  nothing), ``logged_acceptance`` (the share of the prompt's ratings that were up). It is what
  ``python -m ptlight.eval eval.acceptance.path=`` reads.
- ``feedback.json``: the report — events and rows per source, drops and skips with reasons and
  row numbers, duplicates, contradictory labels, the label balance with KTO's
  ``desirable_weight``/``undesirable_weight`` suggested from the counts (the weights that make
  desirable_weight x #desirable = undesirable_weight x #undesirable, within TRL's advised
  [1, 4/3] ratio), per-user skew (top users' shares; users whose ratings all go one way
  where the log's up-rate makes that unlikely, p^n < 1 %) and warnings. The rows are built in
  :mod:`ptlight.data.feedback_rows`.

**Bad input** — a row with neither rating nor edit nor choice, an edit identical to the
response, an unknown rating value, a bad choice, a missing prompt/response, a bad timestamp,
contradictory labels for one (prompt, response) (an up and a down rating; or A > B and B > A),
unpaired rows that are all one label: an error naming the file and row(s) (exit status 2), or
with ``feedback.on_bad_row=drop`` dropped and counted in ``feedback.json`` (a contradiction drops
every event involved; a one-label unpaired set is not written). Duplicates are counted and, with
``feedback.dedupe``, dropped (the first is kept); a duplicate is the same prompt, response and
feedback whoever gave it.

Balance: ``feedback.max_per_user`` keeps a seeded sample of at most N events per user;
``feedback.balance=downsample`` drops seeded majority-label unpaired rows to a 1:1 balance.
What it does not do: infer preferences from implicit signals (dwell time, regenerations).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ptlight.config import config_dir
from ptlight.errors import ConfigError, DataError
from ptlight.data.feedback_rows import balance, downsample, heldout_rows, listwise, pairs, unpaired
from ptlight.runtime.app import or_exit, run_dir
from ptlight.runtime.validate import boolean, finite_number, whole_number

FEEDBACK_COLUMNS = ("rating", "edited", "choice")


class BadEvent(ValueError):
    """A row that cannot be used; ``reason`` is the short key counted in the report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Event:
    row: int
    prompt: Any                      # string or message list, as logged
    key: str                         # canonical JSON of the prompt (grouping key)
    response: str | None = None
    rating: bool | None = None       # True: up
    edited: str | None = None
    responses: list[str] = field(default_factory=list)
    choice: int | None = None
    user: str | None = None
    session: str | None = None
    time: float = 0.0                # timestamp (epoch s), else the row number


# ---- parsing one row ---------------------------------------------------------------------
def _text(value: Any, column: str) -> str:
    """A response's text: a string, an assistant message, or a message list's last turn."""
    if isinstance(value, dict) and "content" in value:
        value = value["content"]
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise BadEvent("wrong type", f"column {column!r} must be a string or a message list, "
                                     f"got {type(value).__name__}")
    if not value.strip():
        raise BadEvent("empty text", f"column {column!r} is an empty string")
    return value.strip()


def _rating(value: Any, ratings: DictConfig) -> bool:
    word = str(value).strip().lower()
    up, down = [str(v).lower() for v in ratings.up], [str(v).lower() for v in ratings.down]
    if word in up:
        return True
    if word in down:
        return False
    raise BadEvent("unknown rating value", f"unknown rating value {value!r}; up is one of "
                   f"{up}, down one of {down} (feedback.ratings.up/down add values)")


def _time(value: Any, row: int) -> float:
    if value is None:
        return float(row)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise BadEvent("bad timestamp", f"timestamp {value!r} is not ISO 8601 text, epoch "
                                        "seconds or a datetime") from None


def _choice(row: dict[str, Any], event: Event) -> None:
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadEvent("bad choice", "a 'choice' needs 'responses': a list of >= 2 responses")
    event.responses = [_text(r, "responses") for r in responses]
    if len(set(event.responses)) < len(event.responses):
        raise BadEvent("bad choice", "'responses' holds the same response twice")
    pick = row["choice"]
    if isinstance(pick, int) and not isinstance(pick, bool) and 0 <= pick < len(responses):
        event.choice = pick
    elif isinstance(pick, str) and pick.strip() in event.responses:
        event.choice = event.responses.index(pick.strip())
    else:
        raise BadEvent("bad choice", f"choice {pick!r} is neither an index into 'responses' "
                       f"(0..{len(responses) - 1}) nor one of their texts")


def parse_event(i: int, row: Any, ratings: DictConfig) -> Event:
    """One log row as an :class:`Event`; :class:`BadEvent` says what is wrong with it."""
    if not isinstance(row, dict):
        raise BadEvent("not an object", f"expected an object, got {type(row).__name__}")
    present = {k: v for k, v in row.items() if v is not None}
    prompt = present.get("prompt", present.get("conversation"))
    if not any(c in present for c in FEEDBACK_COLUMNS):
        raise BadEvent("no feedback", "no feedback in this row: it needs a 'rating' (up/down), "
                       "an 'edited' response, or 'responses' + 'choice' (this row has "
                       f"{sorted(present)})")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or not isinstance(
            prompt, (str, list)) or not prompt:
        raise BadEvent("no prompt", "needs a 'prompt' (or 'conversation'): a non-empty string "
                                    "or message list")
    user, session = present.get("user", present.get("user_id")), present.get(
        "session", present.get("session_id"))
    event = Event(i, prompt, json.dumps(prompt, sort_keys=True),
                  user=None if user is None else str(user),
                  session=None if session is None else str(session),
                  time=_time(present.get("timestamp"), i))
    if "rating" in present or "edited" in present:
        if "response" not in present:
            raise BadEvent("no response", "a rating or an edit needs the 'response' it is about")
        event.response = _text(present["response"], "response")
    if "rating" in present:
        event.rating = _rating(present["rating"], ratings)
    if "edited" in present:
        event.edited = _text(present["edited"], "edited")
        if event.edited == event.response:
            raise BadEvent("edit identical to the response",
                           "the edited text is identical to the response (no edit was made)")
    if "choice" in present:
        _choice(present, event)
    return event


# ---- the log as a whole ------------------------------------------------------------------
class Log:
    """The usable events of one log, and the report of everything done to the rest."""

    def __init__(self, path: str, on_bad_row: str) -> None:
        if on_bad_row not in ("error", "drop"):
            raise ConfigError(f"feedback.on_bad_row={on_bad_row!r}; use error or drop")
        self.path, self.on_bad_row = path, on_bad_row
        self.events: list[Event] = []
        self.dropped: Counter[str] = Counter()
        self.dropped_rows: dict[str, list[int]] = defaultdict(list)

    def bad(self, rows: list[int], reason: str, message: str) -> None:
        """Raise (``on_bad_row=error``) or count a bad row (or rows, for a contradiction)."""
        where = f"row {rows[0]}" if len(rows) == 1 else "rows " + ", ".join(
            map(str, rows[:10])) + (f", ... ({len(rows)} rows)" if len(rows) > 10 else "")
        if self.on_bad_row == "error":
            raise DataError(f"{self.path}, {where}: {message}. Fix the log, or set "
                            "feedback.on_bad_row=drop to drop such rows (they are counted in "
                            "feedback.json).")
        self.dropped[reason] += len(rows)
        self.dropped_rows[reason] += rows

    def report(self) -> dict[str, Any]:
        return {"count": sum(self.dropped.values()), "by_reason": dict(self.dropped),
                "rows": {k: v[:20] for k, v in self.dropped_rows.items()}}


def read_log(path: str, cfg: DictConfig) -> Log:
    """Parse every row of the log; bad rows raise or are counted (``feedback.on_bad_row``)."""
    from ptlight.data.module import load_rows

    log = Log(path, cfg.on_bad_row)
    rows = load_rows(path, key="feedback.path")
    if not rows:
        raise DataError(f"{path}: the feedback log has no rows")
    for i, row in enumerate(rows):
        try:
            log.events.append(parse_event(i, row, cfg.ratings))
        except BadEvent as exc:
            log.bad([i], exc.reason, str(exc))
    return log


def drop_contradictions(log: Log) -> int:
    """An up and a down rating of one (prompt, response), or A > B and B > A in choices:
    every event involved is bad. Returns how many (prompt, response) were contradictory."""
    ratings: dict[tuple, list[Event]] = defaultdict(list)
    prefs: dict[tuple, list[Event]] = defaultdict(list)
    for e in log.events:
        if e.rating is not None:
            ratings[(e.key, e.response)].append(e)
        if e.choice is not None:
            for j, r in enumerate(e.responses):
                if j != e.choice:
                    prefs[(e.key, e.responses[e.choice], r)].append(e)
    bad: set[int] = set()
    found = 0
    for (_, response), events in ratings.items():
        if len({e.rating for e in events}) == 2:
            found += 1
            ups = [e.row for e in events if e.rating]
            downs = [e.row for e in events if not e.rating]
            log.bad(sorted(ups + downs), "contradictory ratings",
                    f"contradictory ratings of one (prompt, response): up at row(s) {ups}, "
                    f"down at row(s) {downs} (response {response[:60]!r})")
            bad.update(ups + downs)
    for (key, a, b), events in prefs.items():
        if (key, b, a) in prefs and a < b:
            found += 1
            rows = sorted({e.row for e in events + prefs[(key, b, a)]})
            log.bad(rows, "contradictory choices", f"contradictory choices: {a[:40]!r} was "
                    f"preferred to {b[:40]!r} and the other way round")
            bad.update(rows)
    log.events = [e for e in log.events if e.row not in bad]
    return found


def _signature(e: Event) -> tuple:
    return (e.key, e.response, e.rating, e.edited, tuple(e.responses), e.choice)


def dedupe(log: Log, drop: bool) -> int:
    """Count (and with ``drop`` remove) repeats of the same prompt, response and feedback."""
    seen: set[tuple] = set()
    kept, duplicates = [], 0
    for e in log.events:
        sig = _signature(e)
        if sig in seen:
            duplicates += 1
            if drop:
                continue
        seen.add(sig)
        kept.append(e)
    log.events = kept
    return duplicates


def user_skew(events: list[Event], warn_share: float, chance: float = 0.01) -> dict[str, Any]:
    """Events per user: how many users, the top users' shares, and one-sided raters: users
    whose ratings all go one way although, at the log's overall up-rate p, that happens by
    chance with probability p^n (all up) or (1-p)^n (all down) below ``chance``."""
    counts = Counter(e.user for e in events if e.user is not None)
    if not counts:
        return {"users": 0, "note": "no 'user' column: per-user checks skipped"}
    total = sum(counts.values())
    top = counts.most_common()
    by_user: dict[str, list[bool]] = defaultdict(list)
    for e in events:
        if e.user is not None and e.rating is not None:
            by_user[e.user].append(e.rating)
    ratings = [r for rs in by_user.values() for r in rs]
    p_up = sum(ratings) / len(ratings) if ratings else 0.5
    one_sided = {u: f"all {len(r)} {'up' if r[0] else 'down'}" for u, r in sorted(by_user.items())
                 if len(set(r)) == 1 and (p_up if r[0] else 1 - p_up) ** len(r) < chance}
    return {"users": len(counts), "events_with_user": total, "max_events": top[0][1],
            "top_user": top[0][0], "top_user_share": top[0][1] / total,
            "top5_share": sum(n for _, n in top[:5]) / total,
            "over_share": [u for u, n in top if n / total > warn_share] if len(counts) >= 5
                          else [],  # with a handful of users every one holds a large share
            "one_sided_raters": one_sided}


def cap_per_user(events: list[Event], cap: int | None, rng: random.Random) -> tuple[list, int]:
    """At most ``cap`` events per user (a seeded sample, log order kept); returns the events
    and how many were dropped. Events without a user are kept."""
    if cap is None:
        return events, 0
    if cap < 1:
        raise ConfigError(f"feedback.max_per_user={cap}: use a positive count or null")
    by_user: dict[str, list[int]] = defaultdict(list)
    for idx, e in enumerate(events):
        if e.user is not None:
            by_user[e.user].append(idx)
    dropped = {i for idxs in by_user.values() if len(idxs) > cap
               for i in set(idxs) - set(rng.sample(idxs, cap))}
    return [e for i, e in enumerate(events) if i not in dropped], len(dropped)


def split_holdout(events: list[Event], fraction: float) -> tuple[list, list]:
    """(train, held out): the newest ``fraction`` of prompts (ordered by their first event)
    and all their events are held out, so no held-out prompt is trained on."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"feedback.holdout={fraction}: use a fraction in [0, 1)")
    if fraction == 0:
        return events, []
    first: dict[str, float] = {}
    for e in events:
        first[e.key] = min(first.get(e.key, e.time), e.time)
    newest = sorted(first, key=lambda k: (first[k], k))
    held = set(newest[len(newest) - math.ceil(fraction * len(newest)):])
    return [e for e in events if e.key not in held], [e for e in events if e.key in held]


# ---- the app -----------------------------------------------------------------------------
def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _warnings(report: dict[str, Any], cfg: DictConfig) -> list[str]:
    users, bal = report["users"], report["balance"]
    out = [f"user {u!r} holds more than {cfg.skew_warn:.0%} of the events "
           "(feedback.max_per_user caps it)" for u in users.get("over_share", [])]
    out += [f"user {u!r} rated {how}: unlikely by chance at the log's up-rate (a one-sided "
            "rater?)" for u, how in users.get("one_sided_raters", {}).items()]
    share = bal.get("desirable_share")
    if share is not None and not 0.25 <= share <= 0.75:
        out.append(f"unpaired labels are {share:.0%} desirable: use the suggested KTO weights "
                   "or feedback.balance=downsample")
    return out


def check_settings(fb: DictConfig) -> None:
    """The switches and thresholds of ``feedback`` in range (a string "no" would be truthy)."""
    boolean(fb.unpaired_from_pairs, "feedback.unpaired_from_pairs",
            "whether edits and choices also give KTO rows")
    boolean(fb.pairs_from_ratings, "feedback.pairs_from_ratings",
            "whether up- and down-rated responses to one prompt give pairs")
    boolean(fb.dedupe, "feedback.dedupe", "whether repeated events are dropped")
    finite_number(fb.min_edit, "feedback.min_edit", 0.0, 1.0, False,
                  "the normalised edit distance from which an edit is a preference", "0.1")
    finite_number(fb.skew_warn, "feedback.skew_warn", 0.0, 1.0, True,
                  "the share of events one user may hold before a warning", "0.2")
    whole_number(fb.listwise_min, "feedback.listwise_min", 2,
                 "distinct rated responses a prompt needs for a listwise row")


def convert(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Read ``cfg.feedback.path``, write the data files into ``out_dir``; returns the report
    (also written to ``feedback.json``)."""
    fb = cfg.feedback
    if not fb.path:
        raise ConfigError("feedback.path is not set: pass feedback.path=<log .jsonl/.parquet>")
    if fb.balance not in ("none", "downsample"):
        raise ConfigError(f"feedback.balance={fb.balance!r}; use none or downsample")
    check_settings(fb)
    rng = random.Random(f"feedback-{cfg.seed}")
    log = read_log(fb.path, fb)
    total = len(log.events) + log.dropped.total()
    contradictions = drop_contradictions(log)
    duplicates = dedupe(log, fb.dedupe)
    users = user_skew(log.events, fb.skew_warn)
    events, capped = cap_per_user(log.events, fb.max_per_user, rng)
    train, held = split_holdout(events, fb.holdout)
    skipped: Counter[str] = Counter()
    pair_rows = pairs(train, fb, skipped)
    kto_rows = unpaired(train, pair_rows, fb.unpaired_from_pairs)
    list_rows = listwise(train, fb.listwise_min)
    labels = {r["label"] for r in kto_rows}
    if len(labels) == 1:
        which = "desirable (up)" if labels == {True} else "undesirable (down)"
        log.bad(sorted(r["row"] for r in kto_rows), "unpaired rows all one label",
                f"all {len(kto_rows)} unpaired rows are {which}: KTO needs both labels")
        kto_rows = []
    bal = balance(kto_rows)
    downsampled = 0
    if fb.balance == "downsample" and bal["desirable"] and bal["undesirable"]:
        kto_rows, downsampled = downsample(kto_rows, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"unpaired.jsonl": kto_rows, "pairwise.jsonl": pair_rows,
             "listwise.jsonl": list_rows, "heldout.jsonl": heldout_rows(held)}
    for name, rows in files.items():
        if rows:
            _write(out_dir / name, rows)
        else:  # no stale file from an earlier conversion into the same directory
            (out_dir / name).unlink(missing_ok=True)
    if not kto_rows and not pair_rows:
        raise DataError(f"{fb.path}: no training rows ({log.report()['by_reason'] or 'no drops'}; "
                        f"skipped {dict(skipped)})")
    sources = Counter()
    for e in events:
        sources.update(s for s, on in (("rating", e.rating is not None),
                                       ("edit", e.edited is not None),
                                       ("choice", e.choice is not None)) if on)
    report: dict[str, Any] = {
        "path": str(fb.path), "output_dir": str(out_dir), "rows_read": total,
        "events_used": len(events), "events_by_source": dict(sources),
        "dropped": log.report(), "skipped": dict(skipped),
        "contradictions": contradictions, "duplicates": duplicates,
        "duplicates_dropped": duplicates if fb.dedupe else 0, "capped_per_user": capped,
        "downsampled": downsampled, "users": users, "balance": bal,
        "heldout": {"prompts": len(files["heldout.jsonl"]), "events": len(held)},
        "written": {name: len(rows) for name, rows in files.items()},
        "rows_by_source": {name: dict(Counter(r["source"] for r in rows))
                           for name, rows in files.items() if name != "heldout.jsonl"},
        "settings": {k: v for k, v in fb.items() if k != "ratings"},
    }
    report["warnings"] = _warnings(report, fb)
    (out_dir / "feedback.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def print_summary(report: dict[str, Any]) -> None:
    w, d = report["written"], report["dropped"]
    print(f"read {report['rows_read']} events ({report['events_by_source']}); dropped "
          f"{d['count']} {d['by_reason']}; skipped {report['skipped']}; duplicates "
          f"{report['duplicates']}; contradictions {report['contradictions']}")
    print(f"wrote {w} to {report['output_dir']}; report in feedback.json")
    bal = report["balance"]
    if "suggested" in bal:
        print(f"unpaired labels: {bal['desirable']} desirable / {bal['undesirable']} "
              f"undesirable; KTO: {bal['suggested']['override']}")
    for line in report["warnings"]:
        print(f"warning: {line}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="feedback")
def _app(cfg: DictConfig) -> None:
    out = Path(cfg.feedback.output_dir) if cfg.feedback.output_dir else run_dir()
    print_summary(or_exit("ptlight.feedback", convert, cfg, out))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
