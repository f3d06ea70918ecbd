"""``python -m ptlight.eval``: evaluate an exported model, as its own Hydra app.

    python -m ptlight.eval model.path=outputs/<date>/<time>/1-dpo/export
    python -m ptlight.eval model.path=A eval.baseline=B        # + win rate of A vs B
    python -m ptlight.eval model.path=A eval.reference=REF     # preference accuracy by log-ratio
    python -m ptlight.eval model.path=A eval.baseline=B \
        'eval.judge={name: reward_model, path: RM}'             # score and win rate under an RM
    python -m ptlight.eval model.path=A eval.do_sample=true eval.temperature=0.7
    python -m ptlight.eval -m model.path=A,B                   # one job per model

It composes the same root config as training (``conf/config.yaml``) and reads its ``model``,
``data`` and ``eval`` groups only. Into its Hydra run dir it writes:

- ``eval.json``: ``model``, ``task``; ``gold`` (mean gold reward, exact-match rate and the first
  ``eval.num_samples`` generations on ``eval.num_prompts`` held-out prompts of ``data.task``);
  with ``eval.baseline``: ``baseline`` (the same for the baseline) and ``win_rate`` (win = a
  strictly higher gold reward on a prompt; ``tie_rate`` and ``loss_rate`` beside it);
  ``preference`` (accuracy of the implicit reward on held-out pairs, see
  :func:`ptlight.eval.gold.preference_accuracy`): ``eval.num_pairs`` held-out pairs of the task,
  or the validation split of ``data.path`` as training splits it; ``eval.num_pairs=0`` skips it.
  ``eval.reference`` must share the model's tokenizer, as a training reference does.
  ``gold`` and ``baseline`` also hold ``acceptance/rate`` (gold reward >=
  ``eval.acceptance.threshold``) and ``acceptance/edit_distance`` (to the task's reference
  answers; :mod:`ptlight.eval.acceptance`). With ``eval.acceptance.path`` (held-out prompts with
  optional references, such as ``python -m ptlight.feedback``'s ``heldout.jsonl``) or
  ``eval.acceptance.judge`` (a reward plugin spec scored against the threshold):
  ``acceptance`` holds the same for the model and the baseline on those prompts, and the win
  rate vs the baseline under those scores.
  With ``eval.judge`` (a ``ptlight.rewards`` plugin spec: ``name`` + its settings, e.g. a trained
  ``reward_model`` with ``path``): ``judge`` holds the judge's mean score of the model's (and the
  baseline's) generations on the same prompts, and the win rate under that judge.
- ``samples.jsonl``: every held-out prompt with each model's generation and gold reward
  (``stage`` "eval", ``when`` "model" or "baseline").
- ``report.md`` and ``gold.png`` (model vs baseline).

A model that cannot be loaded, or a config it cannot use, exits with status 2 and one line.
Heavy imports (torch, transformers) happen after Hydra has parsed the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ptlight.config import config_dir, register_resolvers, resolve_device
from ptlight.errors import ConfigError, DataError
from ptlight.report import md_table, plot_gold, samples_table
from ptlight.runtime.app import or_exit, run_dir, user_overrides
from ptlight.runtime.validate import check_eval
from ptlight.tasks import Task

register_resolvers()


def _device(name: str):
    return resolve_device(name, "eval.device")


def _load(cfg: DictConfig, path: str | None, tokenizer=None):
    """(model, tokenizer) of ``path`` with ``cfg.model``'s other settings, on ``eval.device``;
    ``tokenizer`` given: the model must fit it (a reference scores the same token ids).
    ``path`` None: the configured architecture at its initialisation (seeded by ``seed``), the
    model a training run starts from when ``model.path`` is null."""
    import lightning as L

    from ptlight.model.backbone import build_policy, load_tokenizer

    model_cfg = OmegaConf.merge(cfg.model, {"path": path})
    if path != cfg.model.path:
        model_cfg.tokenizer = None  # a baseline brings its own tokenizer
    if path is None:
        L.seed_everything(cfg.seed, verbose=False)
    tokenizer = tokenizer or load_tokenizer(model_cfg)
    model = build_policy(model_cfg, tokenizer).to(_device(cfg.eval.device))
    model.eval()
    return model, tokenizer


def _gold(cfg: DictConfig, task: Task, model, tokenizer, baseline: str | None
          ) -> tuple[dict, list[dict]]:
    """Gold metric of the model (and the baseline, with the win rate); sample rows."""
    from ptlight.eval.gold import gold_acceptance, gold_samples, summarize, win_rate

    result: dict[str, Any] = {}
    runs = {"model": gold_samples(model, tokenizer, task, cfg.eval, "gold eval (model)")}
    threshold = cfg.eval.acceptance.threshold
    result["gold"] = {**summarize(runs["model"], cfg.eval.num_samples, task),
                      **gold_acceptance(runs["model"], task, threshold)}
    if baseline:
        base_model, base_tok = _load(cfg, baseline)
        runs["baseline"] = gold_samples(base_model, base_tok, task, cfg.eval,
                                        "gold eval (baseline)")
        result["baseline"] = {"path": baseline,
                              **summarize(runs["baseline"], cfg.eval.num_samples, task),
                              **gold_acceptance(runs["baseline"], task, threshold)}
        result["win_rate"] = win_rate(runs["model"], runs["baseline"])
    rows = [{"stage": "eval", "when": when, "prompt": s.prompt, "generation": s.completion,
             "reward": s.reward} for when, samples in runs.items() for s in samples]
    if cfg.eval.get("judge"):
        result["judge"] = _judge(cfg, runs)
    return result, rows


def _judge(cfg: DictConfig, runs: dict[str, list]) -> dict[str, Any]:
    """Score every run's generations with the ``eval.judge`` reward plugin (prompts as the
    task's user turn, so a reward model sees them in its training format); win rate of the
    model vs the baseline under that judge."""
    from ptlight.eval.gold import Sample, win_rate
    from ptlight.rewards import build_reward

    spec = OmegaConf.to_container(cfg.eval.judge, resolve=True)
    threshold = spec.pop("threshold", None)
    judge = build_reward(spec, key="eval.judge").to(_device(cfg.eval.device))
    scored: dict[str, list[Sample]] = {}
    for who, samples in runs.items():
        prompts = [[{"role": "user", "content": s.prompt}] for s in samples]
        scores = judge(prompts, [s.completion for s in samples]).tolist()
        scored[who] = [Sample(s.prompt, s.completion, r) for s, r in zip(samples, scores)]
    out: dict[str, Any] = {"spec": {**spec, "threshold": threshold}}
    for who, samples in scored.items():
        out[f"{who}/mean"] = sum(s.reward for s in samples) / len(samples)
        if threshold is not None:  # the judge's own pass rate: score >= eval.judge.threshold
            out[f"{who}/pass_rate"] = (sum(s.reward >= threshold for s in samples)
                                       / len(samples))
    if "baseline" in scored:
        out["win_rate"] = win_rate(scored["model"], scored["baseline"])
    return out


def _acceptance(cfg: DictConfig, task: Task | None, model, tokenizer,
                heldout: tuple[list, list] | None = None) -> dict[str, Any]:
    """Acceptance on ``eval.acceptance.path``'s prompts (else the task's held-out prompts),
    scored by ``eval.acceptance.judge`` (else the task's gold reward): the model's and the
    baseline's rate and edit distance to the references, and the model's win rate vs the
    baseline under the same scores. ``heldout``: ``eval.acceptance.path``'s prompts and
    references, read before any weights loaded."""
    from ptlight.eval.acceptance import acceptance_summary
    from ptlight.eval.gold import Sample, generate, win_rate
    from ptlight.rewards import build_reward, user_text

    acc, e = cfg.eval.acceptance, cfg.eval
    if heldout is not None:
        prompts, refs = heldout
    else:
        assert task is not None
        prompts = [r["prompt"] for r in task.make_rows("prompt", acc.num_prompts, e.seed,
                                                       "heldout")]
        refs = [task.reference_answer(user_text(p)) for p in prompts]
    if acc.judge:
        spec = OmegaConf.to_container(acc.judge, resolve=True)
        judge = build_reward(spec, key="eval.acceptance.judge").to(_device(e.device))
        score = lambda comps: judge(prompts, comps).tolist()  # noqa: E731
    else:
        assert task is not None
        score = lambda comps: task.score(prompts, comps)  # noqa: E731
    out: dict[str, Any] = {"prompts": acc.path or f"{task} held-out",
                           "judge": OmegaConf.to_container(acc.judge, resolve=True)
                           if acc.judge else f"gold ({task})"}
    scored: dict[str, list[Sample]] = {}
    models = {"model": (model, tokenizer)}
    if e.baseline:
        models["baseline"] = _load(cfg, e.baseline)
    for who, (m, tok) in models.items():
        comps = generate(m, tok, prompts, max_new_tokens=e.max_new_tokens,
                         batch_size=e.batch_size, do_sample=e.do_sample,
                         temperature=e.temperature, seed=e.seed, description=f"acceptance ({who})")
        scored[who] = [Sample(user_text(p), c, r) for p, c, r in zip(prompts, comps, score(comps))]
        out[who] = acceptance_summary([s.reward for s in scored[who]], comps, refs, acc.threshold)
    if "baseline" in scored:
        out["win_rate"] = win_rate(scored["model"], scored["baseline"])
    return out


def _preference(cfg: DictConfig, model, tokenizer) -> dict[str, Any]:
    """Preference accuracy on held-out pairwise rows, read through the DataModule."""
    from ptlight.data.module import PtlDataModule
    from ptlight.eval.gold import preference_accuracy

    overrides: dict[str, Any] = {"batch_size": cfg.eval.batch_size}
    if cfg.data.path is None:  # the task's held-out split; one train row (unused) keeps setup cheap
        overrides.update(num_train=1, val_size=cfg.eval.num_pairs)
    data = OmegaConf.merge(cfg.data, overrides)
    try:
        dm = PtlDataModule(data, tokenizer, "pairwise")
        dm.setup()
    except DataError as exc:
        raise DataError(f"{exc} (preference accuracy reads pairwise rows; "
                        "eval.num_pairs=0 skips it)") from None
    reference = _load(cfg, cfg.eval.reference, tokenizer)[0] if cfg.eval.reference else None
    loader = dm.val_dataloader()
    result = preference_accuracy(model, loader, total=len(loader), reference=reference)
    return {**result, "reference": cfg.eval.reference}


def run_eval(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None
             ) -> dict[str, Any]:
    """Evaluate ``model.path`` (null: the configured architecture at init); writes eval.json,
    samples.jsonl and report.md to ``run_dir``. ``overrides``: the command line's, which
    decide whether the data config's bundled task was chosen (as in training)."""
    from ptlight.eval.acceptance import read_heldout
    from ptlight.eval.gold import write_jsonl
    from ptlight.model.backbone import check_model_source
    from ptlight.tasks import resolve_task
    from ptlight.train import drop_unchosen_task

    cfg = drop_unchosen_task(cfg, overrides)
    check_eval(cfg.eval, training=False)
    acc = cfg.eval.acceptance
    task = resolve_task(cfg.data.task, args=cfg.data.get("task_args"))  # a task file's rewards are built (and checked) here
    how = "data.task=<a task name, or a task file: held-out prompts + reward plugins>"
    if task is not None and cfg.eval.num_prompts == 0:
        raise ConfigError(f"eval.num_prompts=0 with task {task.name!r}: the evaluation "
                          "generates for the task's held-out prompts; write eval.num_prompts=200 "
                          "(or another count >= 1), or data.task=null for preference accuracy "
                          "alone")
    if task is None and cfg.eval.num_pairs <= 0 and not acc.path:
        raise ConfigError(f"nothing to evaluate: no task (set {how}) and eval.num_pairs=0 (no "
                          "preference accuracy)")
    if task is None and (acc.path or acc.judge) and not (acc.path and acc.judge):
        raise ConfigError("eval.acceptance needs prompts and a scorer: with no task, set "
                          "both eval.acceptance.path and eval.acceptance.judge")
    if cfg.eval.baseline and task is None and not acc.judge:
        raise ConfigError(f"eval.baseline needs a task (its gold reward judges the win rate; "
                          f"set {how}) or eval.acceptance.judge")
    if cfg.eval.get("judge") and task is None:
        raise ConfigError(f"eval.judge scores generations on the task's held-out prompts, and "
                          f"there is no task: set {how}")
    _device(cfg.eval.device)  # a bad device fails before any weights load
    for key in ("baseline", "reference"):  # so do missing model dirs, named by their key
        if cfg.eval.get(key):
            check_model_source(cfg.eval[key], f"eval.{key}")
    heldout = read_heldout(acc.path, acc.num_prompts) if acc.path else None  # bad rows, too
    model, tokenizer = _load(cfg, cfg.model.path)
    if task is not None:
        task.to(_device(cfg.eval.device))
    arch = (cfg.model.get("arch") or {}).get("model_type", "the configured model")
    described = cfg.model.path or f"{arch} at init (seed {cfg.seed})"
    result: dict[str, Any] = {"model": described, "task": None if task is None else task.name}
    rows: list[dict] = []
    if task is not None:
        gold, rows = _gold(cfg, task, model, tokenizer, cfg.eval.baseline)
        result.update(gold)
    if acc.path or acc.judge:
        result["acceptance"] = _acceptance(cfg, task, model, tokenizer, heldout)
    pairs = cfg.data.path or (task is not None and "pairwise" in task.kinds)
    if cfg.eval.num_pairs > 0 and pairs:
        result["preference"] = _preference(cfg, model, tokenizer)
    elif cfg.eval.num_pairs > 0:
        result["notes"] = [f"no preference accuracy: task {task} has held-out prompts only; "
                           "pairs come from data.path"]
    result["eval"] = OmegaConf.to_container(cfg.eval, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    if rows:
        write_jsonl(run_dir / "samples.jsonl", rows)
    write_eval_report(run_dir, result)
    return result


def _summary_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for who in ("gold", "baseline"):
        if who in result:
            name = "model" if who == "gold" else "baseline"
            rows.append((f"{name} gold reward", result[who]["gold/reward"]))
            if result[who]["gold/exact"] is not None:
                rows.append((f"{name} exact match", result[who]["gold/exact"]))
            rows += [(f"{name} {key}", value) for key, value in result[who].items()  # task's own
                     if "/" in key and not key.startswith("gold/") and "/num_" not in key
                     and key != "acceptance/threshold" and value is not None]
    if "win_rate" in result:
        w = result["win_rate"]
        rows += [("win rate vs baseline", w["win_rate"]), ("tie rate", w["tie_rate"]),
                 ("loss rate", w["loss_rate"])]
    if "judge" in result:
        j = result["judge"]
        rows += [(f"{who} score under judge {j['spec']['name']!r}", j[f"{who}/mean"])
                 for who in ("model", "baseline") if f"{who}/mean" in j]
        rows += [(f"{who} pass rate under judge {j['spec']['name']!r} (score >= "
                  f"{j['spec']['threshold']})", j[f"{who}/pass_rate"])
                 for who in ("model", "baseline") if f"{who}/pass_rate" in j]
        if "win_rate" in j:
            rows.append((f"win rate vs baseline under judge {j['spec']['name']!r}",
                         j["win_rate"]["win_rate"]))
    if "acceptance" in result:
        a = result["acceptance"]
        for who in ("model", "baseline"):
            if who in a:
                rows.append((f"{who} acceptance rate ({a['prompts']})", a[who]["acceptance/rate"]))
                if a[who]["acceptance/edit_distance"] is not None:
                    rows.append((f"{who} edit distance to references",
                                 a[who]["acceptance/edit_distance"]))
        if "win_rate" in a:
            rows.append(("win rate vs baseline on the acceptance prompts", a["win_rate"]["win_rate"]))
    if "preference" in result:
        p = result["preference"]
        rows.append((f"preference accuracy ({p['num_pairs']} pairs, {p['score']})",
                     p["accuracy"]))
    return rows


def _setup_line(result: dict[str, Any]) -> str:
    """What was measured how: task, prompts, decoding, baseline and reference."""
    e = result["eval"]
    decoding = f"sampled at temperature {e['temperature']}" if e["do_sample"] else "greedy"
    words = [f"Task `{result['task']}`, {e['num_prompts']} held-out prompts, {decoding}"
             if result["task"] else "No gold metric (no task)"]
    words += [f"{k} `{e[k]}`" for k in ("baseline", "reference") if e[k]]
    return "; ".join(words) + ".\n"


def write_eval_report(run_dir: Path, result: dict[str, Any]) -> Path:
    """``report.md`` (+ ``gold.png``) of one evaluation."""
    e = result["eval"]
    parts = [f"# ptlight eval: `{result['model']}`\n", _setup_line(result),
             md_table(("metric", "value"), _summary_rows(result))]
    points = [(name, result[k]) for k, name in (("gold", "model"), ("baseline", "baseline"))
              if k in result]
    if plot_gold(points, f"Gold metric: {result['task']}, {e['num_prompts']} held-out prompts",
                 run_dir / "gold.png"):
        parts.append("![gold metric](gold.png)\n")
    if result.get("gold", {}).get("samples"):
        parts += ["## Sample generations (model)\n", samples_table(result["gold"]["samples"])]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out


def _print_summary(result: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"eval of {result['model']}")
    table.add_column("metric")
    table.add_column("value")
    for name, value in _summary_rows(result):
        table.add_row(name, f"{value:.3f}")
    Console().print(table)
    print(f"wrote {run_dir / 'eval.json'}, samples.jsonl and report.md")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    out = run_dir()
    result = or_exit("ptlight.eval", run_eval, cfg, out, user_overrides())
    _print_summary(result, out)
    return result.get("gold", {}).get("gold/reward")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
