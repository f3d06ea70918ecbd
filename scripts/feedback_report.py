"""Product feedback -> KTO / DPO, end to end on the bundled ``sort`` task (docs/feedback.md "From product
feedback to training data").

    python scripts/feedback_report.py                       # everything, into outputs/feedback_report
    python scripts/feedback_report.py --sft-steps 150 --steps 60 --prompts 600   # the defaults
    python scripts/feedback_report.py --sft outputs/feedback_report/sft/export  # reuse step 1

1. SFT on the task's (hurried-annotator) demonstrations: the "product" model.
2. Simulated traffic: each of ``--prompts`` train prompts is asked by one user (a third of
   them) or two, drawn from 24 users with Zipf-distributed activity (a few users dominate); the
   product answers by sampling at temperature 0.7. A user accepts a correct answer (thumbs up),
   edits a near miss (gold reward >= 0.5) into the correct answer (80 %; else thumbs down), and
   rejects the rest; 15 % of interactions show two answers and the user picks the better one.
   Three noisy users (the 4th, 8th and 12th most active) rate at random and never edit or
   choose. The log also has what real logs have: 2 % of events logged twice, whitespace-only
   "edits" (3 % of accepted answers), and four broken rows (two without feedback, an unknown
   rating value, an edit identical to the response).
3. ``python -m ptlight.feedback`` with ``feedback.on_bad_row=drop feedback.holdout=0.1
   feedback.max_per_user=<cap>``.
4. KTO (unpaired.jsonl, the suggested weights) and DPO (pairwise.jsonl) from the SFT export,
   ``--steps`` each, gold eval on the task's held-out prompts (acceptance = an exactly sorted
   answer).
5. ``python -m ptlight.eval`` of KTO and DPO vs the SFT model on the feedback's held-out prompts
   (the newest 10 %): acceptance, edit distance to the users' references, win rate vs SFT.

Prints the conversion report and a markdown table of acceptance before/after.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

NUM_USERS, NOISY = 24, ("u03", "u07", "u11")  # noisy: rate at random, never edit


def ptlight(module: str, *args: str) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def simulate(sft_export: Path, num_prompts: int, seed: int) -> list[dict]:
    """The feedback log of the simulated users (module doc, step 2)."""
    from hydra import compose, initialize_config_dir

    from ptlight.model.backbone import build_policy, load_tokenizer
    from ptlight.config import config_dir
    from ptlight.eval.gold import generate
    from ptlight.tasks import sort

    rng = random.Random(seed)
    with initialize_config_dir(config_dir(), version_base="1.3"):
        model_cfg = compose("config", overrides=[f"model.path={sft_export}"]).model
    tok = load_tokenizer(model_cfg)
    policy = build_policy(model_cfg, tok)
    users = [f"u{i:02d}" for i in range(NUM_USERS)]
    weights = [1 / (r + 1) ** 1.1 for r in range(NUM_USERS)]
    prompts = [r["prompt"] for r in sort.make_rows("prompt", num_prompts, seed, "train")]
    visits = [(p, u, rng.random() < 0.15) for p in prompts
              for u in rng.sample(rng.choices(users, weights, k=4), rng.choice((1, 2, 2)))]
    asks = [p for p, _, two in visits for _ in range(2 if two else 1)]
    answers = iter(generate(policy, tok, asks, max_new_tokens=40, batch_size=64, do_sample=True,
                            temperature=0.7, seed=seed, description="simulated traffic"))
    start = datetime(2026, 10, 1, tzinfo=timezone.utc)
    log = []
    for n, (prompt, user, two) in enumerate(visits):
        text = prompt[-1]["content"]
        base = {"prompt": prompt, "user": user, "session": f"s{n // 3}",
                "timestamp": (start + timedelta(minutes=40 * n)).isoformat()}
        shown = [next(answers) for _ in range(2 if two else 1)]
        gold = [sort.gold_reward(text, a) for a in shown]
        if two and gold[0] != gold[1] and user not in NOISY:
            log.append({**base, "responses": shown, "choice": gold.index(max(gold))})
            continue
        answer, g = shown[0], gold[0]
        if user in NOISY:
            log.append({**base, "response": answer, "rating": rng.choice(("up", "down"))})
        elif g == 1.0:
            log.append({**base, "response": answer, "rating": "up"})
            if rng.random() < 0.03:  # re-formatting only: same words
                log.append({**base, "response": answer, "edited": answer.replace(" ", "  ", 1)})
        elif g >= 0.5 and rng.random() < 0.8:
            log.append({**base, "response": answer, "edited": sort.reference_answer(text)})
        else:
            log.append({**base, "response": answer, "rating": "down"})
        if rng.random() < 0.02:  # the client logged the event twice
            log.append(dict(log[-1]))
    row = log[len(log) // 2]
    log[5:5] = [{"prompt": row["prompt"], "response": "x", "user": "u01"},  # no feedback
                {**{k: row[k] for k in ("prompt", "user")}, "response": "y", "rating": None},
                {"prompt": row["prompt"], "response": "apple", "rating": "meh", "user": "u02"},
                {"prompt": row["prompt"], "response": "apple", "edited": "apple", "user": "u03"}]
    return log


def gold_row(name: str, report: dict, acc: dict | None, steps, wall) -> list:
    g = report
    return [name, g["gold/reward"], g["acceptance/rate"], g["acceptance/edit_distance"],
            acc["acceptance/rate"] if acc else None,
            acc["acceptance/edit_distance"] if acc else None, steps, wall]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/feedback_report")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=600)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft", help="an SFT export made by step 1 of an earlier run: skip step 1")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    common = [f"eval.num_prompts={args.eval_prompts}", "eval.val_samples=0",
              "trainer.enable_progress_bar=false", f"seed={args.seed}"]
    if args.sft is None:
        ptlight("ptlight", "method=sft", f"trainer.max_steps={args.sft_steps}",
                "eval.before=false", f"hydra.run.dir={out}/sft", *common)
    sft = Path(args.sft).resolve() if args.sft else out / "sft" / "export"
    log = simulate(sft, args.prompts, args.seed)
    (out / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    ptlight("ptlight.feedback", f"feedback.path={out}/feedback.jsonl", "feedback.holdout=0.1",
            "feedback.on_bad_row=drop", "feedback.max_per_user=150",
            f"hydra.run.dir={out}/data")
    fb = json.loads((out / "data" / "feedback.json").read_text())
    weights = fb["balance"]["suggested"]["override"].split()
    runs = {"kto": ["method=kto", f"data.path={out}/data/unpaired.jsonl", *weights],
            "dpo": ["method=dpo", f"data.path={out}/data/pairwise.jsonl"]}
    for name, extra in runs.items():
        ptlight("ptlight", *extra, f"model.path={sft}", f"trainer.max_steps={args.steps}",
                f"eval.before={str(name == 'kto').lower()}", f"hydra.run.dir={out}/{name}",
                *common)
        ptlight("ptlight.eval", f"model.path={out}/{name}/export", f"eval.baseline={sft}",
                f"eval.acceptance.path={out}/data/heldout.jsonl", "eval.num_pairs=0",
                f"eval.num_prompts={args.eval_prompts}", f"hydra.run.dir={out}/{name}-eval")
    report(out, sft, fb, time.time() - started, reused=args.sft is not None)


def report(out: Path, sft: Path, fb: dict, wall: float, reused: bool) -> None:
    kto, dpo = (json.loads((out / n / "eval.json").read_text()) for n in ("kto", "dpo"))
    evals = {n: json.loads((out / f"{n}-eval" / "eval.json").read_text())["acceptance"]
             for n in ("kto", "dpo")}
    print("\nconversion:", json.dumps({k: fb[k] for k in (
        "rows_read", "events_by_source", "dropped", "skipped", "duplicates", "contradictions",
        "capped_per_user", "written", "rows_by_source", "balance", "heldout", "warnings")},
        indent=1))
    print(f"users: {fb['users']['users']}, top user {fb['users']['top_user']} "
          f"{fb['users']['top_user_share']:.1%}, top 5 {fb['users']['top5_share']:.1%}, "
          f"one-sided raters {fb['users']['one_sided_raters']}")
    sft_run = json.loads((sft.parent / "eval.json").read_text())
    rows = [gold_row("SFT", kto["before"], evals["kto"]["baseline"], sft_run["global_step"],
                     sft_run["wall_time_s"])]
    for name, rep in (("KTO", kto), ("DPO", dpo)):
        rows.append(gold_row(f"SFT → {name}", rep["after"], evals[name.lower()]["model"],
                             rep["global_step"], rep["wall_time_s"]))
    header = ["model", "gold reward", "acceptance (task held-out)", "edit distance",
              "acceptance (feedback held-out)", "edit distance (feedback)", "steps", "stage wall s"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join("–" if v is None else f"{v:.3f}" if isinstance(v, float)
                                else str(v) for v in r) + " |")
    for name in ("kto", "dpo"):
        w = evals[name]["win_rate"]
        print(f"{name.upper()} vs SFT on {w['num_prompts']} feedback held-out prompts: win "
              f"{w['win_rate']:.3f}, tie {w['tie_rate']:.3f}, loss {w['loss_rate']:.3f}")
    print(f"total wall {wall:.0f} s" + (" (SFT reused: step 1 not included)" if reused else ""))


if __name__ == "__main__":
    main()
