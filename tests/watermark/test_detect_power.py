"""``watermark detect`` states its power next to a "not traced": on text that carries no watermark
(nothing to trace), the text output and the JSON give the smallest detectable effect, the
observed one with its interval and the sizes it would need, for the unweighted (keyed-hash)
and the weighted (SynthID layers) test."""

from __future__ import annotations

import json

import pytest

from tests.servers import run_cli

TEXT = (
    "The lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, "
    "polished the lens and wrote the weather in a small book: wind from the west, rain by "
    "midnight, a fishing boat late into the harbour. In winter the storms came one after "
    "another, and the light turned all night over the black water.\n"
)


@pytest.mark.parametrize("scheme,test", [("keyed-hash", "binomial"), ("synthid", "weighted")])
def test_not_traced_comes_with_the_power(scheme, test, tmp_path):
    text = tmp_path / "answer.txt"
    text.write_text(TEXT * 3)
    args = ("watermark", "detect", "--file", str(text), "--accounts", "acme,bystander")
    args += ("--scheme", scheme, "--model", "tiny")
    env = {"DISTILLGUARD_WATERMARK_SECRET": "power-test-secret", "OMP_NUM_THREADS": "1"}
    out = run_cli(*args, "--json", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["traced"] == []
    power = result["power"]
    assert power["account"] in ("acme", "bystander") and power["test"] == test
    assert power["level"] == pytest.approx(1e-3 / 2)
    assert 0 < power["mde"] < 1 and power["ci"][0] <= power["observed"] <= power["ci"][1]
    # no watermark: the interval holds 0, and a test this small misses small effects
    assert power["ci"][0] < 0 < power["ci"][1] and power["power_at_observed"] < 0.5
    if power["units_for_power"] is not None:
        assert power["units_for_power"] > power["units"]
        assert power["queries_for_power"] >= 1  # in texts of this one's size
    assert all("power" in k for k in result["keys"])
    text_out = run_cli(*args, env=env)
    assert text_out.returncode == 0, text_out.stderr
    said = " ".join(text_out.stdout.split())  # rich may wrap lines when not on a terminal
    assert "traced to: no account" in said
    assert "not traced:" in said and "with 80% power" in said and "To raise the power" in said
