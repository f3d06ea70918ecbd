"""``python -m ptlight.objectives``: list installed objectives with their provenance."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ptlight.errors import PluginError
from ptlight.objectives import get_objective, plugin_info


def main() -> None:
    table = Table(title="ptlight objectives (entry-point group ptlight.objectives)")
    for col in ("name", "data", "reference", "entry point", "distribution", "version"):
        table.add_column(col)
    for info in plugin_info():
        try:
            cls = get_objective(info.name)
            kind, ref = cls.data_kind, "yes" if cls.needs_reference else "no"
        except PluginError as exc:
            kind, ref = "[red]broken[/red]", str(exc)
        table.add_row(info.name, kind, ref, info.value, info.distribution, info.version)
    Console().print(table)


if __name__ == "__main__":
    main()
