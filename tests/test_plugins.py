"""The generic plugin registry (distillguard.plugins) against real installed distributions."""

from __future__ import annotations

import logging

import pytest

from distillguard.errors import ConfigError
from distillguard.plugins import Registry
from tests.plugin_dist import install_plugin

GROUP = "distillguard.test-widgets"


def _positive(name, obj):
    if not isinstance(obj, int) or obj <= 0:
        raise TypeError(f"expected a positive int, got {obj!r}")
    return obj


@pytest.fixture
def widgets(monkeypatch, tmp_path):
    install_plugin(
        monkeypatch,
        tmp_path / "good",
        "widget-good",
        {"widget_good": "ONE = 1\nTWO = 2\n"},
        {GROUP: {"one": "widget_good:ONE", "two": "widget_good:TWO"}},
    )
    install_plugin(
        monkeypatch,
        tmp_path / "bad",
        "widget-bad",
        {"widget_bad": "raise RuntimeError('widget_bad is broken')\n", "widget_neg": "N = -3\n"},
        {
            GROUP: {
                "broken": "widget_bad:ANY",
                "negative": "widget_neg:N",
                "missing": "widget_good:NOPE",
            }
        },
    )
    return Registry(GROUP, "widget", check=_positive, has_builtins=False)


def test_entry_points_load_and_bad_plugins_are_reported_without_hiding_the_others(widgets, caplog):
    with caplog.at_level(logging.WARNING, logger="distillguard.plugins"):
        assert widgets.all() == {"one": 1, "two": 2}
    assert set(widgets.errors) == {"broken", "negative", "missing"}
    assert "widget_bad is broken" in widgets.errors["broken"]
    assert "positive int" in widgets.errors["negative"]
    assert "widget-bad" in widgets.errors["missing"]  # names the package to blame
    assert sum("not loaded" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(ConfigError, match=r"'broken'.*failed to load.*widget_bad is broken"):
        widgets.get("broken")


def test_an_unknown_name_names_the_group_and_the_known_names(widgets):
    with pytest.raises(ConfigError) as e:
        widgets.get("three")
    msg = str(e.value)
    assert "'three'" in msg and GROUP in msg and "one, two" in msg


def test_run_time_additions_and_name_clashes(widgets):
    widgets.add("three", 3)
    assert widgets.get("three") == 3 and "three" in widgets
    widgets.add("three", 3)  # the same object again: no-op
    with pytest.raises(ConfigError, match="two widgets named 'one'"):
        widgets.add("one", 11)
    with pytest.raises(TypeError, match="positive int"):
        widgets.add("zero", 0)
    widgets.remove("three")
    assert "three" not in widgets


def test_a_plugin_cannot_replace_a_builtin(monkeypatch, tmp_path):
    group = "distillguard.detectors"
    install_plugin(
        monkeypatch,
        tmp_path,
        "evil-volume",
        {"evil_volume": "class VolumeDetector:\n    name = 'volume'\n"},
        {group: {"volume": "evil_volume:VolumeDetector"}},
    )
    reg = Registry(group, "detector")
    assert reg.get("volume").__module__ == "distillguard.detect.volume"
    assert "reuses the name of a built-in" in reg.errors["volume"]


def test_a_group_without_its_builtins_says_to_reinstall():
    reg = Registry("distillguard.no-such-group", "gadget")
    with pytest.raises(ConfigError, match=r"pip install -e \."):
        reg.all()
