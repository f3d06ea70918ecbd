"""Human-readable reports: ``report.md`` plus PNG plots for a training run, a pipeline, an
evaluation and a Hydra multirun sweep; and the model card of an HF export.

    python -m ptlight.report <multirun dir>     # report.md (one row per job) + gold.png

What each writer reads and writes (all in the directory it is given):

- :func:`write_run_report` (end of every training stage): ``metrics.csv`` (Lightning's
  CSVLogger: one row per logging event keyed by ``step``, columns sparse across rows),
  ``eval.json`` and ``config.yaml`` -> ``report.md``, ``loss.png`` (train and val loss),
  ``rewards.png`` (preference methods: reward margins and accuracies), ``ppo.png`` (PPO:
  rollout reward, KL with β, clip fraction), ``reward_model.png`` (``rm``: pairwise accuracy and
  margin), ``gold.png`` (gold reward and exact match before/after, when the run has a gold eval).
- :func:`write_pipeline_report`: ``report.md`` linking each stage's report and ``gold.png``
  across stages (start, after each stage).
- :func:`write_eval_report` (``python -m ptlight.eval``): ``report.md`` + ``gold.png``.
- :func:`sweep_report`: job subdirs (``eval.json``, ``.hydra/overrides.yaml``) -> one table of
  final metrics, jobs labelled by the overrides that differ between them.
- :func:`write_model_card`: ``README.md`` of an export, with hub front matter.

Plots use matplotlib's object API on its Agg canvas (no pyplot, no global backend switch), so
they work headless and inside other programs. Numbers are read back from the files, so a
report can be rebuilt from a finished run dir alone.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ptlight.tasks import task_label

GOLD_KEYS = (("gold/reward", "gold reward"), ("gold/exact", "exact match"))
ACCEPTANCE_KEYS = (("acceptance/rate", "acceptance"),  # ptlight/eval/acceptance.py
                   ("acceptance/edit_distance", "edit distance to reference"))
Series = dict[str, list[tuple[int, float]]]


# ---- reading -----------------------------------------------------------------------------
def read_metrics(path: Path) -> Series:
    """``metrics.csv`` -> metric name -> [(step, value)] for the rows where it was logged."""
    series: Series = {}
    if not path.is_file():
        return series
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- plots -------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _smooth(values: Sequence[float]) -> list[float]:
    """Centred moving average (no lag), its window growing with the run: 3 points at 30."""
    half = max(1, len(values) // 30)
    windows = (values[max(0, i - half) : i + half + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def _curves(ax, series: Series, metric: str, title: str, ylabel: str) -> bool:
    """Train (raw + smoothed when long) and val curves of ``<split>/<metric>`` on ``ax``."""
    drawn = False
    for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
        points = series.get(f"{split}/{metric}")
        if not points:
            continue
        steps, values = zip(*points)
        if split == "train" and len(values) >= 20:
            ax.plot(steps, values, color=color, lw=1, alpha=0.3, label="train (per step)")
            ax.plot(steps, _smooth(values), color=color, lw=2, label="train (smoothed)")
        else:
            ax.plot(steps, values, color=color, lw=2, marker="o", ms=4, label=split)
        drawn = True
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best")
    return drawn


def plot_loss(series: Series, out: Path) -> bool:
    fig, (ax,) = _figure()
    if _curves(ax, series, "loss", "Training and validation loss", "loss"):
        fig.savefig(out, dpi=120)
        return True
    return False


def plot_rewards(series: Series, out: Path) -> bool:
    """Implicit reward margins and accuracies (preference methods log both)."""
    if "train/rewards/margins" not in series and "val/rewards/margins" not in series:
        return False
    fig, (left, right) = _figure(ncols=2, width=5.6)
    _curves(left, series, "rewards/margins", "Reward margin (chosen − rejected)",
            "implicit reward margin")
    left.axhline(0, color="grey", lw=1, ls="--")
    _curves(right, series, "rewards/accuracies", "Reward accuracy",
            "fraction with chosen > rejected")
    right.axhline(0.5, color="grey", lw=1, ls="--", label="chance")
    right.set_ylim(-0.03, 1.03)
    right.legend(loc="best")
    fig.savefig(out, dpi=120)
    return True


def plot_ppo(series: Series, out: Path) -> bool:
    """PPO at a glance: reward (score and KL-penalised), KL to the reference with β, clip
    fractions, and the validation score."""
    if "train/objective/kl" not in series:
        return False
    fig, axes = _figure(ncols=3, width=5.0)
    _curves(axes[0], series, "objective/scores", "Reward of the rollouts", "mean score")
    if series.get("val/objective/scores"):
        steps, values = zip(*series["val/objective/scores"])
        axes[0].plot(steps, values, color="tab:orange", lw=2, marker="o", ms=4, label="val")
        axes[0].legend(loc="best")
    _curves(axes[1], series, "objective/kl", "KL to the reference (per sequence)", "nats")
    if series.get("train/objective/kl_coef"):
        twin = axes[1].twinx()
        steps, values = zip(*series["train/objective/kl_coef"])
        twin.plot(steps, values, color="tab:red", lw=1, ls="--")
        twin.set_ylabel("β (dashed)", color="tab:red")
    _curves(axes[2], series, "policy/clipfrac", "Fraction of clipped ratios", "clipfrac")
    for ax in axes:
        ax.set_xlabel("rollout batch")
    fig.savefig(out, dpi=120)
    return True


def _lines(ax, series: Series, keys: Sequence[tuple[str, str]], title: str, ylabel: str) -> None:
    """One line per ``train/<key>`` with its label."""
    for key, label in keys:
        if series.get(f"train/{key}"):
            steps, values = zip(*series[f"train/{key}"])
            ax.plot(steps, values, lw=1.5, label=label)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def plot_group(series: Series, out: Path) -> bool:
    """Critic-free RL at a glance: the rollouts' reward (and the greedy val reward), its std
    within groups, KL to the reference (when β > 0), clip ratios and completion length."""
    if "train/frac_reward_zero_std" not in series:
        return False
    fig, axes = _figure(ncols=5, width=4.2)
    _curves(axes[0], series, "reward", "Reward (train: rollouts; val: greedy)", "mean reward")
    _lines(axes[1], series, (("reward_std", "reward std (batch)"),
                             ("frac_reward_zero_std", "share of groups with std 0")),
           "Signal in the groups", "")
    if not _curves(axes[2], series, "kl", "KL to the reference (k3, per token)", "nats"):
        axes[2].text(0.5, 0.5, "β = 0: no reference", ha="center", va="center",
                     transform=axes[2].transAxes)
    _lines(axes[3], series, (("clip_ratio/low_mean", "low"), ("clip_ratio/high_mean", "high"),
                             ("clip_ratio/region_mean", "region")),
           "Clipped token ratios", "fraction")
    _curves(axes[4], series, "completions/mean_length", "Completion length", "tokens")
    fig.savefig(out, dpi=120)
    return True


def plot_reward_model(series: Series, out: Path) -> bool:
    """Reward-model accuracy and margin (``method=rm``)."""
    if "train/center_loss" not in series:
        return False
    fig, (left, right) = _figure(ncols=2, width=5.6)
    _curves(left, series, "accuracy", "Pairwise accuracy", "fraction with r(chosen) > r(rejected)")
    left.axhline(0.5, color="grey", lw=1, ls="--", label="chance")
    left.set_ylim(-0.03, 1.03)
    left.legend(loc="best")
    _curves(right, series, "margin", "Reward margin (chosen − rejected)", "reward margin")
    right.axhline(0, color="grey", lw=1, ls="--")
    fig.savefig(out, dpi=120)
    return True


def plot_gold(points: Sequence[tuple[str, dict[str, Any]]], title: str, out: Path) -> bool:
    """Grouped bars: one group per model/moment (``points``), gold reward and exact match."""
    if not points:
        return False
    fig, (ax,) = _figure(width=max(5.0, 1.6 * len(points) + 2.5))
    width = 0.38
    for j, ((key, label), color) in enumerate(zip(GOLD_KEYS, ("tab:green", "tab:purple"))):
        xs = [i + (j - 0.5) * width for i in range(len(points))]
        bars = ax.bar(xs, [m[key] for _, m in points], width, label=label, color=color)
        ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=9)
    ax.set_xticks(range(len(points)), [name for name, _ in points])
    ax.set(title=title, ylabel="score (higher is better)", ylim=(0, 1.25))
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncols=2)  # above the bars: values stop at 1.0
    fig.savefig(out, dpi=120)
    return True


def plot_jobs(labels: Sequence[str], values: Sequence[float | None], out: Path) -> bool:
    """Horizontal bars of the gold reward of each sweep job (failed jobs left out)."""
    pairs = [(lab, v) for lab, v in zip(labels, values) if v is not None]
    if not pairs:
        return False
    fig, (ax,) = _figure(width=8.0, height=max(2.5, 0.45 * len(pairs) + 1.4))
    bars = ax.barh(range(len(pairs)), [v for _, v in pairs], color="tab:green")
    ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=9)
    ax.set_yticks(range(len(pairs)), [lab for lab, _ in pairs])
    ax.invert_yaxis()  # job 0 on top, as in the table
    ax.set(title="Gold reward per job (held-out prompts)", xlabel="gold reward", xlim=(0, 1.1))
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(out, dpi=120)
    return True


# ---- markdown ----------------------------------------------------------------------------
def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _gold_points(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{when} training", report[when]) for when in ("before", "after") if when in report]


def _gold_table(points: Sequence[tuple[str, dict[str, Any]]]) -> str:
    keys = GOLD_KEYS + tuple(k for k in ACCEPTANCE_KEYS if all(k[0] in m for _, m in points))
    return md_table(("model", *(label for _, label in keys)),
                    [(name, *(m[k] for k, _ in keys)) for name, m in points])


def _task_name(cfg: DictConfig, report: dict[str, Any]) -> str | None:
    """The task a run was evaluated on: its name in the run's report, else from the config."""
    return report.get("task") or task_label(cfg.data.task)


def objective_hparams(cfg: DictConfig) -> dict[str, Any]:
    """``method.objective`` without its ``name``: the hyperparameters the run used."""
    hparams: dict[str, Any] = OmegaConf.to_container(cfg.method.objective, resolve=True)  # type: ignore[assignment]
    return {k: v for k, v in hparams.items() if k != "name"}


def training_rows(cfg: DictConfig, report: dict[str, Any]) -> list[tuple[str, str]]:
    """What was trained, from what, on what: the key/value rows shared by report and card."""
    data = report.get("data", {})
    source = (f"task `{_task_name(cfg, report)}`" if cfg.data.path is None
              else f"`{cfg.data.path}`")
    batch = (f"{cfg.data.batch_size} per device × {cfg.trainer.devices} device(s) × "
             f"{cfg.trainer.accumulate_grad_batches} accumulated")
    optim = cfg.method.optim
    hparams = ", ".join(f"{k}={v}" for k, v in objective_hparams(cfg).items()) or "defaults"
    start = f"`{cfg.model.path}`" if cfg.model.path else "fresh weights from `model.arch`"
    return [
        ("method", f"`{cfg.method.module}`"),
        ("objective", f"`{report.get('objective', cfg.method.objective.name)}` ({hparams})"),
        ("reference", f"`{cfg.method.reference}`"),
        ("start model", start),
        ("data", f"{source}: {data.get('train_rows', '?')} train / {data.get('val_rows', '?')} "
                 f"val examples, {data.get('dropped', 0)} dropped"),
        ("steps", f"{report.get('global_step', '?')} (batch {batch})"),
        ("optimizer", f"AdamW lr={optim.lr}, {optim.scheduler} schedule, "
                      f"warmup {optim.warmup_ratio}"),
        ("precision", f"`{cfg.trainer.precision}`"),
        ("wall time", f"{report.get('wall_time_s', '?')} s"),
    ]


def samples_table(samples: Sequence[dict[str, Any]], n: int = 5) -> str:
    return md_table(("prompt", "generation", "gold reward"),
                    [(s["prompt"], s["completion"] or "(empty)", s["reward"]) for s in samples[:n]])


def write_run_report(run_dir: Path) -> Path:
    """``report.md`` and the PNG plots of a finished training stage (see the module doc)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    report = _read_json(run_dir / "eval.json")
    series = read_metrics(run_dir / "metrics.csv")
    name = report.get("objective", cfg.method.objective.name)
    parts = [f"# ptlight run: {name}\n", md_table(("", ""), training_rows(cfg, report))]
    points = _gold_points(report)
    if points:
        n = points[-1][1]["num_prompts"]
        decoding = "sampled" if cfg.eval.do_sample else "greedy"
        plot_gold(points, f"Gold metric: {_task_name(cfg, report)}, {n} held-out prompts",
                  run_dir / "gold.png")
        parts += [f"## Gold metric ({n} held-out `{_task_name(cfg, report)}` prompts, "
                  f"{decoding})\n",
                  _gold_table(points), "![gold metric](gold.png)\n"]
    parts.append("## Training curves\n")
    if plot_loss(series, run_dir / "loss.png"):
        parts.append("![loss](loss.png)\n")
    if plot_rewards(series, run_dir / "rewards.png"):
        parts.append("![reward margins and accuracies](rewards.png)\n")
    if plot_ppo(series, run_dir / "ppo.png"):
        parts.append("![PPO: reward, KL, clip fraction](ppo.png)\n")
    if plot_group(series, run_dir / "grpo.png"):
        parts.append("![group RL: reward, reward std, KL, clip ratios, length](grpo.png)\n")
    if plot_reward_model(series, run_dir / "reward_model.png"):
        parts.append("![reward model accuracy and margin](reward_model.png)\n")
    if "heldout" in report:
        held = report["heldout"]
        parts += [f"## Reward model on {held['num_pairs']} held-out pairs\n",
                  md_table(("metric", "value"), [("pairwise accuracy", held["rm/accuracy"]),
                                                 ("mean margin", held["rm/margin"])])]
    final = report.get("final_metrics", {})
    if final:
        parts += ["## Final metrics\n", md_table(("metric", "value"), sorted(final.items()))]
    if "after" in report and report["after"]["samples"]:
        parts += ["## Sample generations (after training)\n",
                  samples_table(report["after"]["samples"])]
    parts.append("Files: `config.yaml`, `metrics.csv`, `eval.json`, `samples.jsonl`, "
                 "`checkpoints/`, [`export/`](export/README.md) (model card).\n")
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out


def write_pipeline_report(run_dir: Path, reports: Sequence[dict[str, Any]]) -> Path:
    """Top-level ``report.md`` of a pipeline: one row and link per stage, gold across stages."""
    rows, points = [], []
    for r in reports:
        stage_dir = Path(r["export_dir"]).parent
        link = f"[{stage_dir.name}]({os.path.relpath(stage_dir / 'report.md', run_dir)})"
        gold = r.get("after", {})
        rows.append((link, r["objective"], r.get("global_step"), gold.get("gold/reward"),
                     gold.get("gold/exact"), round(r["wall_time_s"])))
        if "before" in r and not points:
            points.append((f"start\n(before {r['stage']})", r["before"]))
        if "after" in r:
            points.append((f"after {r['stage']}", r["after"]))
    parts = ["# ptlight pipeline\n", "Each stage starts from the previous stage's export.\n",
             md_table(("stage", "objective", "steps", "gold reward", "exact match", "wall s"),
                      rows)]
    if points and plot_gold(points, "Gold metric across stages", run_dir / "gold.png"):
        parts += ["## Gold metric across stages\n",
                  _gold_table([(n.replace("\n", " "), m) for n, m in points]),
                  "![gold metric across stages](gold.png)\n"]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out


# ---- model card --------------------------------------------------------------------------
def _front_matter(export_dir: Path, cfg: DictConfig, objective: str) -> tuple[str, bool]:
    """Hub YAML front matter; a LoRA export (PEFT format) is a ``peft`` model of its base."""
    adapter = _read_json(export_dir / "adapter_config.json")
    meta: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    base = adapter.get("base_model_name_or_path") or cfg.model.path
    if base:
        meta["base_model"] = str(base)
    tags = ["ptlight", str(cfg.method.module), objective] + (["lora"] if adapter else [])
    meta.update(tags=list(dict.fromkeys(tags)), pipeline_tag="text-generation")
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n", bool(adapter)


def _usage(export_dir: Path, adapter: bool) -> str:
    cls, lib = ("AutoPeftModelForCausalLM", "peft") if adapter else \
        ("AutoModelForCausalLM", "transformers")
    return (f"```python\nfrom {lib} import {cls}\nfrom transformers import AutoTokenizer\n\n"
            f'path = "{export_dir}"  # or the hub repo id after pushing\n'
            f"model = {cls}.from_pretrained(path)\n"
            "tokenizer = AutoTokenizer.from_pretrained(path)\n```\n")


def _method_sections(export_dir: Path, cfg: DictConfig, report: dict[str, Any]) -> list[str]:
    """Card sections only a reward model (head file, held-out accuracy) or a PPO policy
    (reward source, PPO settings, value head) has."""
    parts: list[str] = []
    if (export_dir / "reward_head.json").is_file():
        held = report.get("heldout")
        parts.append("## Reward model\n")
        if held:
            parts.append(f"Pairwise accuracy on {held['num_pairs']} held-out pairs: "
                         f"**{held['rm/accuracy']:.3f}** (mean margin {held['rm/margin']:.3f}).\n")
        parts.append(
            "The scalar head is `reward_head.safetensors` (`weight [1, H]`, `bias [1]`; rewards "
            "centred on the validation set, shift in `reward_head.json`), read at the last "
            "token of prompt + completion:\n\n```python\nimport torch, safetensors.torch\n"
            "from transformers import AutoModel, AutoTokenizer\n"
            "tok = AutoTokenizer.from_pretrained(d); base = AutoModel.from_pretrained(d)\n"
            "head = safetensors.torch.load_file(f\"{d}/reward_head.safetensors\")\n"
            "h = base(input_ids=ids, attention_mask=mask).last_hidden_state\n"
            "reward = h[torch.arange(len(ids)), mask.sum(1) - 1] @ head[\"weight\"].T + head[\"bias\"]\n"
            "```\n\nIn ptlight: `method=ppo reward=reward_model reward.path=<this dir>` "
            "or `python -m ptlight.eval 'eval.judge={name: reward_model, path: <this dir>}'`.\n")
    if cfg.method.module == "ppo":
        reward = OmegaConf.to_container(cfg.reward, resolve=True)
        settings = OmegaConf.to_container(cfg.method.ppo, resolve=True)
        parts += ["## PPO\n", f"Reward: `{reward}`. Value head: `value_head.safetensors`.\n",
                  md_table(("setting", "value"), [(k, str(v)) for k, v in settings.items()])]
    return parts


def write_model_card(export_dir: Path, cfg: DictConfig, report: dict[str, Any]) -> Path:
    """``README.md`` of an HF export: hub front matter, training summary, metrics, usage."""
    objective = str(report.get("objective", cfg.method.objective.name))
    front, adapter = _front_matter(export_dir, cfg, objective)
    origin = f"from `{cfg.model.path}`" if cfg.model.path else "from fresh weights"
    hparams = [(k, str(v)) for k, v in objective_hparams(cfg).items()] or [("(none)", "")]
    parts = [front, f"# {export_dir.parent.name}: {objective}\n",
             f"Post-trained with ptlight ({cfg.method.module} / {objective}), {origin}.\n",
             "## Training\n", md_table(("", ""), training_rows(cfg, report)),
             "### Objective hyperparameters\n", md_table(("hyperparameter", "value"), hparams)]
    points = _gold_points(report)
    if points:
        parts += [f"## Gold metric (held-out `{_task_name(cfg, report)}` prompts)\n",
                  _gold_table(points)]
    final = sorted((k, v) for k, v in report.get("final_metrics", {}).items()
                   if k.startswith("val/"))
    if final:
        parts += ["## Final validation metrics\n", md_table(("metric", "value"), final)]
    parts += _method_sections(export_dir, cfg, report)
    parts += ["## Usage\n", _usage(export_dir, adapter)]
    out = export_dir / "README.md"
    out.write_text("\n".join(parts))
    return out


# ---- sweeps ------------------------------------------------------------------------------
def _gold(report: dict[str, Any], key: str) -> float | None:
    """A gold metric of a training job (``after``) or of a ``ptlight.eval`` job (``gold``)."""
    return (report.get("after") or report.get("gold") or {}).get(key)


def _final(report: dict[str, Any], key: str) -> float | None:
    return report.get("final_metrics", {}).get(key)


SWEEP_COLUMNS = (  # header, value from a job's eval.json (None: not measured by that job)
    ("gold reward", lambda r: _gold(r, "gold/reward")),
    ("exact match", lambda r: _gold(r, "gold/exact")),
    ("win rate", lambda r: r.get("win_rate", {}).get("win_rate")),
    ("pref. accuracy", lambda r: r.get("preference", {}).get("accuracy")),
    ("RM accuracy", lambda r: r.get("heldout", {}).get("rm/accuracy")),
    ("val loss", lambda r: _final(r, "val/loss")),
    ("val reward acc.", lambda r: _final(r, "val/rewards/accuracies")),
    ("val gold reward", lambda r: _final(r, "val/gold/reward")),
    ("train loss", lambda r: _final(r, "train/loss")),
    ("train reward acc.", lambda r: _final(r, "train/rewards/accuracies")),
    ("steps", lambda r: r.get("global_step")),
    ("wall s", lambda r: round(r["wall_time_s"]) if "wall_time_s" in r else None),
)


def _job_config(job: Path) -> dict[str, Any]:
    for path in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def missing_metrics(job: Path, report: dict[str, Any]) -> list[str]:
    """Why a job's row lacks the gold, validation or training columns, one phrase each."""
    if not report:
        return ["failed: no eval.json (the job stopped before it finished; see its log)"]
    cfg = _job_config(job)
    notes = []
    if "after" not in report and "gold" not in report and "heldout" not in report:
        task = (cfg.get("data") or {}).get("task")
        notes.append("no gold metric: " + ("no task (set data.task to a task name or a task "
                                           "file)" if task is None else
                                           "the method does not generate"))
    finals = report.get("final_metrics", {})
    if "global_step" not in report:  # an evaluation job: no training metrics to expect
        return notes
    if not any(k.startswith("val/") for k in finals):
        trainer = cfg.get("trainer") or {}
        steps, every = trainer.get("max_steps"), trainer.get("val_check_interval")
        why = (f"trainer.max_steps={steps} < trainer.val_check_interval={every}"
               if isinstance(steps, int) and isinstance(every, int) and steps < every
               else "no validation ran")
        notes.append(f"no val/ metrics: {why}")
    if not any(k.startswith("train/") for k in finals):
        notes.append("no train/ metrics: nothing was logged (trainer.log_every_n_steps)")
    return notes


def sweep_jobs(multirun_dir: Path) -> list[Path]:
    """Job dirs of a Hydra multirun (those with ``.hydra/overrides.yaml``), in job order."""
    jobs = [p for p in multirun_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def sweep_rows(multirun_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per job: job, its differing overrides, the final metrics."""
    jobs = sweep_jobs(multirun_dir)
    overrides = [list(OmegaConf.load(j / ".hydra" / "overrides.yaml")) for j in jobs]
    shared = set(overrides[0]).intersection(*overrides) if overrides else set()
    reports = [_read_json(j / "eval.json") for j in jobs]
    keep = [(name, get) for name, get in SWEEP_COLUMNS
            if any(get(r) is not None for r in reports)]
    notes = ["; ".join(missing_metrics(job, r)) for job, r in zip(jobs, reports)]
    rows = []
    for job, ovr, r, note in zip(jobs, overrides, reports, notes):
        label = " ".join(o for o in ovr if o not in shared) or " ".join(ovr) or "(defaults)"
        rows.append([job.name, label, *(get(r) for _, get in keep),
                     *([note] if any(notes) else [])])
    return ["job", "overrides", *(name for name, _ in keep),
            *(["missing"] if any(notes) else [])], rows


def sweep_report(multirun_dir: Path) -> Path:
    """``report.md`` (one table row per job) and ``gold.png`` in ``multirun_dir``."""
    header, rows = sweep_rows(multirun_dir)
    if not rows:
        raise FileNotFoundError(f"{multirun_dir}: no job dirs with .hydra/overrides.yaml; pass "
                                "the dir of a `python -m ptlight -m ...` sweep")
    parts = [f"# ptlight sweep: {multirun_dir.name}\n", f"{len(rows)} jobs; columns are final "
             "values from each job's `eval.json` (`missing` says what a job did not measure, "
             "and why).\n", md_table(header, rows)]
    if "gold reward" in header:
        col = header.index("gold reward")
        if plot_jobs([f"#{r[0]} {r[1]}" for r in rows], [r[col] for r in rows],
                     multirun_dir / "gold.png"):
            parts.append("![gold reward per job](gold.png)\n")
    out = multirun_dir / "report.md"
    out.write_text("\n".join(parts))
    return out


def main(argv: Sequence[str]) -> int:
    """``python -m ptlight.report <multirun dir>``: write and print the sweep table."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m ptlight.report <multirun dir>", file=sys.stderr)
        return 2
    try:
        out = sweep_report(Path(argv[0]))
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"ptlight.report: error: {exc}", file=sys.stderr)
        return 2
    print(out.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
