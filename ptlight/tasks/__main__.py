"""``python -m ptlight.tasks``: list installed tasks with their provenance."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ptlight.errors import PluginError
from ptlight.registry import TASKS


def main() -> None:
    table = Table(title=f"ptlight tasks (entry-point group {TASKS.group})")
    for col in ("name", "status", "entry point", "distribution", "version"):
        table.add_column(col)
    for info in TASKS.info():
        try:
            TASKS.load(info.name)
            status = "ok"
        except PluginError as exc:
            status = f"[red]broken[/red]: {exc}"
        table.add_row(info.name, status, info.value, info.distribution, info.version)
    Console().print(table)


if __name__ == "__main__":
    main()
