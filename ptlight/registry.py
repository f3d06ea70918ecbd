"""One entry-point registry for every kind of plugin: objectives, rewards and tasks.

Each kind is an entry-point group (``ptlight.objectives``, ``ptlight.rewards``,
``ptlight.tasks``). ptlight's own built-ins are registered in its ``pyproject.toml`` exactly as
a third party registers its plugins, so there is one code path for both. A :class:`Registry`
loads an entry point, checks it against the kind's contract, keeps its provenance
(distribution and version) for the ``python -m ptlight.<kind>`` listings, and builds an
instance from config settings (:meth:`Registry.build`): the keys are bound to the
constructor's named parameters, keyword-only or not, and an unknown key is an error that names
it with the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ptlight.errors import ConfigError, PluginError


@dataclass(frozen=True)
class PluginInfo:
    """Where an entry point comes from."""

    name: str
    value: str
    distribution: str
    version: str


def group_entry_points(group: str) -> dict[str, EntryPoint]:
    """Name -> entry point of ``group`` (the first one installed wins a duplicate name)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def plugin_info(group: str) -> list[PluginInfo]:
    """Every entry point of ``group`` with its distribution name and version, by name."""
    out = []
    for name, ep in sorted(group_entry_points(group).items()):
        dist = getattr(ep, "dist", None)
        out.append(PluginInfo(name=name, value=ep.value,
                              distribution=dist.metadata["Name"] if dist is not None else "?",
                              version=dist.version if dist is not None else "?"))
    return out


def settings_of(factory: Callable[..., Any]) -> tuple[list[str], list[str], bool]:
    """``(names, required, takes_any)`` of the settings ``factory`` (a class or function)
    accepts by name: keyword-only and positional-or-keyword parameters (``self`` excluded),
    those without a default, and whether it takes ``**kwargs``."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(factory) and params and params[0].name == "self":
        params = params[1:]
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                             inspect.Parameter.KEYWORD_ONLY)]
    return ([p.name for p in named],
            [p.name for p in named if p.default is inspect.Parameter.empty],
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


class Registry:
    """The plugins of one entry-point group.

    ``noun`` names a plugin in messages ("objective"); ``check(obj)`` returns None when the
    loaded object keeps the kind's contract, else what is wrong (a phrase such as "is not a
    subclass of ptlight.objectives.Objective"); ``setting`` is the word for its constructor
    arguments ("hyperparameter", "setting").
    """

    def __init__(self, group: str, noun: str, check: Callable[[Any], str | None],
                 setting: str = "setting") -> None:
        self.group, self.noun, self.check, self.setting = group, noun, check, setting

    def entry_points(self) -> dict[str, EntryPoint]:
        return group_entry_points(self.group)

    def available(self) -> dict[str, str]:
        """Name -> ``"module:attr"`` of its entry point."""
        return {name: ep.value for name, ep in sorted(self.entry_points().items())}

    def info(self) -> list[PluginInfo]:
        return plugin_info(self.group)

    def installed(self) -> str:
        """The installed names, for messages."""
        return ", ".join(sorted(self.entry_points())) or "none"

    def load(self, name: str) -> Any:
        """The object registered under ``name``.

        Raises ``KeyError`` listing the installed names when ``name`` is unknown, and
        :class:`PluginError` naming the entry point when the plugin fails to import or breaks
        the contract.
        """
        eps = self.entry_points()
        if name not in eps:
            raise KeyError(f"unknown {self.noun} {name!r}; installed {self.noun}s: "
                           f"{self.installed()} (entry-point group {self.group!r})")
        ep = eps[name]
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not look like our bug
            raise PluginError(f"{self.noun} plugin {name!r} (entry point {ep.value!r}) failed "
                              f"to import: {type(exc).__name__}: {exc}") from exc
        problem = self.check(obj)
        if problem:
            raise PluginError(f"{self.noun} plugin {name!r} (entry point {ep.value!r}) {problem}")
        return obj

    def build(self, name: str, settings: dict[str, Any], key: str) -> Any:
        """``load(name)(**settings)`` with every setting checked first.

        ``key`` is where the settings live in the config (``method.objective``); messages name
        ``<key>.<setting>``. Unknown settings and missing required ones are a
        :class:`ConfigError` listing the valid keys; so is a ``TypeError``/``ValueError`` the
        constructor raises about a value.
        """
        try:
            cls = self.load(name)
        except KeyError as exc:
            raise ConfigError(f"{key}.name: {exc.args[0]}") from None
        valid, required, takes_any = settings_of(cls)
        unknown = [] if takes_any else sorted(set(settings) - set(valid))
        if unknown:
            raise ConfigError(
                f"{self.noun} {name!r} has no {self.setting}(s) "
                f"{', '.join(f'{key}.{k}' for k in unknown)}; valid keys: "
                f"{', '.join(valid) or 'none'}")
        missing = [k for k in required if k not in settings]
        if missing:
            raise ConfigError(f"{self.noun} {name!r} needs {', '.join(f'{key}.{k}' for k in missing)}"
                              f" (no default); valid keys: {', '.join(valid)}")
        try:
            return cls(**settings)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key} ({self.noun} {name!r}): {exc}") from exc


def _subclass_of(base_path: str) -> Callable[[Any], str | None]:
    def check(obj: Any) -> str | None:
        module, _, attr = base_path.rpartition(".")
        base = getattr(__import__(module, fromlist=[attr]), attr)
        if not (inspect.isclass(obj) and issubclass(obj, base)):
            return f"is not a subclass of {base_path}"
        return None
    return check


def _objective_contract(obj: Any) -> str | None:
    problem = _subclass_of("ptlight.objectives.base.Objective")(obj)
    if problem:
        return problem.replace("ptlight.objectives.base.", "ptlight.objectives.")
    from ptlight.objectives.base import DATA_KINDS

    if getattr(obj, "data_kind", "") not in DATA_KINDS:
        return f"has data_kind {getattr(obj, 'data_kind', None)!r}; expected one of {DATA_KINDS}"
    return None


def _reward_contract(obj: Any) -> str | None:
    problem = _subclass_of("ptlight.rewards.Reward")(obj)
    return problem


def _task_contract(obj: Any) -> str | None:
    missing = [f for f in ("make_rows", "gold_reward") if not callable(getattr(obj, f, None))]
    if missing:
        return f"has no {' or '.join(missing)} (a task provides both; see ptlight.tasks)"
    return None


def print_listing(reg: Registry, describe: Callable[[Any], dict[str, str]] | None = None) -> None:
    """The ``python -m ptlight.<kind>`` table: every installed plugin of ``reg`` with its
    status (or why it is broken), entry point, distribution and version; ``describe(obj)``
    adds columns for a loaded plugin."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    for info in reg.info():
        try:
            obj = reg.load(info.name)
            status, extra = "ok", describe(obj) if describe else {}
        except PluginError as exc:
            status, extra = f"[red]broken[/red]: {exc}", {}
        rows.append((info, status, extra))
    extra_cols = list(dict.fromkeys(k for _, _, extra in rows for k in extra))
    table = Table(title=f"ptlight {reg.noun}s (entry-point group {reg.group})")
    for col in ("name", *extra_cols, "status", "entry point", "distribution", "version"):
        table.add_column(col)
    for info, status, extra in rows:
        table.add_row(info.name, *(extra.get(c, "") for c in extra_cols), status, info.value,
                      info.distribution, info.version)
    Console().print(table)


OBJECTIVES = Registry("ptlight.objectives", "objective", _objective_contract,
                      setting="hyperparameter")
REWARDS = Registry("ptlight.rewards", "reward", _reward_contract)
TASKS = Registry("ptlight.tasks", "task", _task_contract)
ROLLOUT_ENGINES = Registry("ptlight.rollout_engines", "rollout engine",
                           _subclass_of("ptlight.engine.rollout.RolloutEngine"))
