"""Tasks: held-out prompts plus a gold reward — what every run is evaluated on.

A task is a plugin of the entry-point group ``ptlight.tasks`` (:mod:`ptlight.registry`); the
bundled ``sort`` and ``safety`` are registered in ptlight's ``pyproject.toml`` like any third
party's. A registered task is any object (a module, a class or an instance) that provides
``make_rows(kind, n, seed, split)`` (rows of the data shapes it supports; ``split`` is
``train`` or ``heldout``) and ``gold_reward(prompt, completion) -> float`` (prompt = the user
turn's text); optionally ``kinds`` (the shapes ``make_rows`` supports), ``threshold`` (exact
match: gold reward >= threshold; default 1.0), ``gold_metrics(samples) -> dict[str, float]``
(extra metrics over the scored samples, e.g. the safety task's refusal rates),
``reference_answer(prompt) -> str`` (what the acceptance metric measures edit distance to) and
``check_args(args)`` (raises ValueError for ``data.task_args`` it cannot generate from;
:func:`check_generator_args` does the usual checks). A task without ``check_args`` whose
``make_rows`` takes no ``**kwargs`` has unknown ``data.task_args`` keys refused from its
signature. Either way a bad value is a ConfigError before anything loads, not a failure in the
middle of generating rows.

A task can also be made of files, no code: held-out prompts and reward plugins
(:mod:`ptlight.tasks.files`). ``data.task`` takes a registered name or such a spec;
:func:`resolve_task` turns either into a :class:`Task`. ``python -m ptlight.tasks`` lists the
installed tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptlight.registry import TASKS

GROUP = TASKS.group
ALL_KINDS = ("sft", "pairwise", "listwise", "unpaired", "prompt")


def available_tasks() -> dict[str, str]:
    """Task name -> ``"module:attr"`` of its entry point (group ``ptlight.tasks``)."""
    return TASKS.available()


def get_task(name: str) -> Any:
    """The task object registered under ``name``; ``KeyError`` lists the installed tasks."""
    return TASKS.load(name)


def check_generator_args(args: dict[str, Any], probabilities: Sequence[str] = (),
                         counts: dict[str, int] | None = None) -> None:
    """ValueError unless every key of ``args`` is one of ``probabilities`` (numbers in
    [0, 1]) or ``counts`` (whole numbers of at least the value given)."""
    counts = counts or {}
    unknown = sorted(set(args) - set(probabilities) - set(counts))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; this task takes "
                         f"{', '.join(sorted([*probabilities, *counts])) or 'none'}")
    for key in probabilities:
        value = args.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{key}={value!r}: a probability, a number in [0, 1]")
    for key, least in counts.items():
        value = args.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key}={value!r}: a whole number >= {least}")


def _check_task_args(name: str, impl: Any, args: dict[str, Any]) -> None:
    """The task's ``check_args``, else unknown keys by ``make_rows``' signature; a ConfigError
    naming ``data.task_args`` and the task."""
    import inspect

    from ptlight.errors import ConfigError

    if hasattr(impl, "check_args"):
        try:
            impl.check_args(args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.task_args for task {name!r}: {exc}") from None
        return
    try:
        params = inspect.signature(impl.make_rows).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension)
        return
    if any(p.kind is p.VAR_KEYWORD for p in params) or not args:
        return
    taken = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(args) - set(taken))
    if unknown:
        raise ConfigError(f"data.task_args for task {name!r}: unknown argument(s) "
                          f"{', '.join(unknown)}; this task takes {', '.join(taken) or 'none'}")


class Task:
    """One interface over a registered task and a task made of files.

    ``name``; ``kinds`` (data shapes ``make_rows`` supports); ``threshold`` (gold reward at or
    above which a generation counts as exact; None: no exact-match metric); ``make_rows``;
    ``score(prompts, completions)`` (batched gold rewards; prompts as the rows give them);
    ``gold_metrics(samples)``; ``reference_answer(prompt)``.
    """

    def __init__(self, name: str, impl: Any, args: dict[str, Any] | None = None) -> None:
        self.name, self.impl = name, impl
        # generator arguments (data.task_args) every make_rows call gets, held-out rows too:
        # they define the task's distribution (arith's digit range) as well as its noise
        self.args: dict[str, Any] = dict(args or {})
        self.kinds: tuple[str, ...] = tuple(getattr(impl, "kinds", ALL_KINDS))
        self.threshold: float | None = getattr(impl, "threshold", 1.0)

    def make_rows(self, kind: str, n: int, seed: int, split: str, **args: Any) -> list[dict]:
        return self.impl.make_rows(kind, n, seed, split, **{**self.args, **args})

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        batched = getattr(self.impl, "score", None)
        if batched is not None:
            return list(batched(prompts, completions))
        from ptlight.rewards import user_text

        return [float(self.impl.gold_reward(user_text(p), c))
                for p, c in zip(prompts, completions)]

    def gold_metrics(self, samples: Sequence[Any]) -> dict[str, float]:
        extra = getattr(self.impl, "gold_metrics", None)
        return extra(samples) if extra else {}

    def reference_answer(self, prompt: Any) -> str | None:
        reference = getattr(self.impl, "reference_answer", None)
        return reference(prompt) if reference else None

    def to(self, device: Any) -> Task:
        mover = getattr(self.impl, "to", None)
        if callable(mover) and not isinstance(self.impl, type):
            mover(device)
        return self

    def __str__(self) -> str:
        return self.name


def task_label(value: Any) -> str | None:
    """The name ``data.task`` goes by in reports, without loading anything: a registered
    task's name, a task spec's ``name`` (else its held-out file's stem), a task file's stem."""
    from pathlib import Path

    from omegaconf import DictConfig, OmegaConf

    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return str(value.get("name") or Path(str(value.get("heldout", "task"))).stem)
    if isinstance(value, Task):
        return value.name
    from ptlight.tasks.files import is_spec_file

    return Path(value).stem if is_spec_file(value) else str(value)


def resolve_task(value: Any, key: str = "data.task", args: Any = None) -> Task | None:
    """``data.task`` -> a :class:`Task`: None for null; a registered name; a task spec (a
    mapping, or a ``.yaml``/``.json`` file) -> a task made of files. An unknown name is a
    ConfigError listing the installed tasks. ``args``: ``data.task_args``, the registered
    task's generator arguments for every split (a task made of files takes none)."""
    from omegaconf import DictConfig, OmegaConf

    from ptlight.errors import ConfigError
    from ptlight.tasks.files import FileTask, is_spec_file, load_spec

    if value is None:
        return None
    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=True)
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict) or is_spec_file(value):
        spec = load_spec(value, key)
        return Task(spec["name"], FileTask(spec, key))
    if isinstance(value, Task):
        return value
    try:
        impl = get_task(str(value))
    except KeyError:
        raise ConfigError(f"{key}={value!r} is unknown; installed tasks: "
                          f"{', '.join(available_tasks()) or 'none'}, or a task file "
                          "(.yaml/.json: held-out prompts + reward plugins)") from None
    _check_task_args(str(value), impl, dict(args or {}))
    return Task(str(value), impl, args)
