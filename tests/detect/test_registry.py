"""Detector plugins through a real entry point: found and used by the scorer's selection; a
broken one is reported and the built-ins stay."""

from __future__ import annotations

import pytest

from distillguard.detect.config import DetectConfig
from distillguard.detect.features import extract
from distillguard.detect.registry import DETECTORS, GROUP, Context, select
from distillguard.errors import ConfigError
from tests.detect.synth import T0, record
from tests.plugin_dist import install_plugin

PLUGIN = """
from distillguard.detect.registry import Detector

class CountDetector(Detector):
    name = "count-plugin"

    def observe(self, f, embedding):
        self.n = getattr(self, "n", 0) + 1

    def score(self):
        return float(self.n)

    def reasons(self):
        return [f"{self.n} requests"]

class Misnamed(CountDetector):
    name = "something-else"
"""


@pytest.fixture
def plugin(monkeypatch, tmp_path):
    install_plugin(
        monkeypatch,
        tmp_path,
        "dg-count-detector",
        {"dg_count_detector": PLUGIN, "dg_broken_detector": "import no_such_module_here\n"},
        {
            GROUP: {
                "count-plugin": "dg_count_detector:CountDetector",
                "misnamed": "dg_count_detector:Misnamed",
                "broken": "dg_broken_detector:Anything",
            }
        },
    )
    DETECTORS.reload()
    yield
    monkeypatch.undo()
    DETECTORS.reload()


def test_an_installed_detector_is_found_and_used_and_a_broken_one_hides_nothing(plugin):
    (cls,) = select(["count-plugin"])
    det = cls(Context(DetectConfig()))
    for i in range(3):
        det.observe(extract(record("a", T0 + 60 * i, f"q {i}")), None)
    assert det.score() == 3.0 and det.reasons() == ["3 requests"]

    builtins = {"volume", "timing", "shape", "template", "cot", "mmd", "prada", "coverage"}
    assert builtins | {"fresh", "linking", "count-plugin"} <= set(DETECTORS.all())
    assert "no_such_module_here" in DETECTORS.errors["broken"]
    assert "make its class attribute `name` 'misnamed'" in DETECTORS.errors["misnamed"]
    with pytest.raises(ConfigError, match="failed to load"):
        select(["broken"])


def test_an_uninstalled_plugin_is_gone_after_reload():
    assert "count-plugin" not in DETECTORS.all()
    with pytest.raises(ConfigError, match=f"unknown detector.*{GROUP}"):
        select(["count-plugin"])
