"""Every objective module of this directory imports and honours the plugin contract.

Entry points for these classes may not be registered yet, so they are listed here explicitly
(module stem = objective name, the CLI word).
"""

import importlib
import inspect

import pytest

from ptlight.objectives import DATA_KINDS, Objective

OBJECTIVES = {
    "cdpo": "CDPO",
    "robust": "Robust",
    "ipo": "IPO",
    "hinge": "Hinge",
    "bco_pair": "BCOPair",
    "rdpo": "RDPO",
    "simpo": "SimPO",
    "orpo": "ORPO",
    "slic": "SLiC",
    "kto": "KTO",
    "rank_debiased": "RankDebiased",
    "listwise_pl": "ListwisePL",
    "rdrop": "RDrop",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "reinforce_pp": "ReinforcePP",
    "online_dpo": "OnlineDPO",
    "sparsepo": "SparsePO",
    "tdpo": "TDPO",
}


@pytest.mark.parametrize("stem", sorted(OBJECTIVES))
def test_module_honours_contract(stem):
    cls = getattr(importlib.import_module(f"ptlight.objectives.{stem}"), OBJECTIVES[stem])
    assert inspect.isclass(cls) and issubclass(cls, Objective)
    assert cls.name == stem
    assert cls.data_kind in DATA_KINDS
    assert isinstance(cls.needs_reference, bool)
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    assert params, "every objective has hyperparameters"
    for p in params:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{stem}.{p.name} must be keyword-only"
        assert p.default is not inspect.Parameter.empty, f"{stem}.{p.name} needs a default"
    obj = cls()  # defaults construct
    assert not list(obj.parameters()), "objectives hold no trainable parameters"
    assert inspect.getdoc(importlib.import_module(f"ptlight.objectives.{stem}"))
