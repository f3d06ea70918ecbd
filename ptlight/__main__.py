"""``python -m ptlight``: the Hydra app.

    python -m ptlight                                   # SFT -> DPO on lfm2-tiny, offline
    python -m ptlight method=dpo model=lfm2             # DPO on LiquidAI/LFM2-350M
    python -m ptlight -m method=dpo model.path=DIR method.objective.beta=0.05,0.1
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ptlight.config import config_dir, register_resolvers
from ptlight.runtime.app import or_exit, run_dir, user_overrides

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from ptlight.pipeline import run  # heavy imports after Hydra has parsed the command line

    return or_exit("ptlight", run, cfg, run_dir(), user_overrides())


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
