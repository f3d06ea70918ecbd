"""``python -m ptlight.rewards``: list installed reward plugins with their provenance."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ptlight.rewards import GROUP, get_reward, plugin_info
from ptlight.errors import PluginError


def main() -> None:
    table = Table(title=f"ptlight rewards (entry-point group {GROUP})")
    for col in ("name", "status", "entry point", "distribution", "version"):
        table.add_column(col)
    for info in plugin_info(GROUP):
        try:
            get_reward(info.name)
            status = "ok"
        except PluginError as exc:
            status = f"[red]broken[/red]: {exc}"
        table.add_row(info.name, status, info.value, info.distribution, info.version)
    Console().print(table)


if __name__ == "__main__":
    main()
