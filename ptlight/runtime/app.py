"""What every ``python -m ptlight...`` Hydra app shares: its run dir, and one line (exit
status 2) for a problem the user can fix instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def run_dir() -> Path:
    """The Hydra job's output dir (``hydra.run.dir``, or the job's dir in a multirun)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def user_overrides() -> list[str]:
    """The command-line overrides this Hydra job was composed with."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def or_exit(prog: str, body: Callable[..., T], *args: Any) -> T:
    """``body(*args)``; a :class:`~ptlight.errors.PtlightError` becomes ``<prog>: error: ...``
    on stderr and exit status 2."""
    from ptlight.errors import PtlightError

    try:
        return body(*args)
    except PtlightError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
