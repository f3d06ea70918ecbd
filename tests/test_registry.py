"""The entry-point registry: discovery, errors that name the plugin, provenance."""

from importlib.metadata import EntryPoint

import pytest

from ptlight.errors import ConfigError, PluginError
from ptlight.objectives import (
    Objective,
    available_objectives,
    build_objective,
    get_objective,
    plugin_info,
)
from ptlight import registry


def test_builtins_are_registered_as_entry_points():
    names = available_objectives()
    assert names["dpo"] == "ptlight.objectives.dpo:DPO"
    assert names["sft"] == "ptlight.objectives.sft:SFT"
    dpo = get_objective("dpo")
    assert issubclass(dpo, Objective) and dpo.data_kind == "pairwise" and dpo.needs_reference


def test_unknown_objective_lists_installed_names():
    with pytest.raises(KeyError) as err:
        get_objective("nope")
    assert "dpo" in str(err.value) and "sft" in str(err.value)


def test_provenance_names_distribution_and_version():
    info = {p.name: p for p in plugin_info()}
    assert info["dpo"].distribution == "ptlight"
    assert info["dpo"].version not in ("", "?")


def test_unknown_hyperparameter_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_objective("dpo", {"beta": 0.1, "betta": 0.2})
    assert "method.objective.betta" in str(err.value)
    assert "beta" in str(err.value) and "label_smoothing" in str(err.value)


class NotAnObjective:
    data_kind = "pairwise"


class NoDataKind(Objective):
    name = "nodk"


def _broken(name, value):
    raise RuntimeError("boom at import")


@pytest.fixture
def fake_plugins(monkeypatch, tmp_path):
    """Patch discovery with extra entry points: one that crashes on import, two that break
    the contract, next to the real ones."""
    (tmp_path / "crashing_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points

    def patched(group):
        extra = [
            EntryPoint("crash", "crashing_plugin:Thing", group),
            EntryPoint("notobj", f"{__name__}:NotAnObjective", group),
            EntryPoint("nodk", f"{__name__}:NoDataKind", group),
        ]
        return list(real(group=group)) + (extra if group == registry.OBJECTIVES.group else [])

    monkeypatch.setattr(registry, "entry_points", patched)


def test_broken_plugins_name_the_entry_point_and_others_keep_working(fake_plugins):
    assert {"crash", "notobj", "nodk", "dpo"} <= set(available_objectives())
    with pytest.raises(PluginError, match=r"'crash'.*crashing_plugin:Thing.*boom at import"):
        get_objective("crash")
    with pytest.raises(PluginError, match=r"'notobj'.*not a subclass"):
        get_objective("notobj")
    with pytest.raises(PluginError, match=r"'nodk'.*data_kind"):
        get_objective("nodk")
    assert get_objective("dpo").name == "dpo"


def test_listing_command_shows_provenance_and_broken_plugins(fake_plugins, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    from ptlight.objectives.__main__ import main

    main()
    out = capsys.readouterr().out
    assert "dpo" in out and "ptlight.objectives.dpo:DPO" in out and "ptlight" in out
    assert "broken" in out and "boom at import" in out
