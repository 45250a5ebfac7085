"""``distillguard demo`` end to end on a tiny random teacher: a real gateway subprocess on loopback,
the real harvester and ``openai`` client, online detection, the policy ladder, the watermark and
the canary test, with truths known by construction (who extracted, who did not, which text came
from another model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillguard.arena.demo import DISTILLER, KINDS, DemoConfig, run_demo
from distillguard.errors import ConfigError
from tests.servers import run_cli

SMALL = dict(
    model="tiny",
    cal_accounts=40,
    eval_accounts=20,
    campaign_requests=150,
    users=3,
    user_requests=2,
    extract=96,
    max_tokens=32,
    max_prompt_chars=200,
    student="prune:1",
    epochs=3.0,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_demo(DemoConfig(out=tmp_path_factory.mktemp("demo"), **SMALL))


def test_detection_act_catches_campaigns_and_spares_most_benign_users(report):
    det = report["detection"]
    assert set(det["campaigns"]) == set(KINDS)
    for kind, k in det["campaigns"].items():
        assert k["flagged"] == k["accounts"], kind
        assert k["median_requests_to_flag"] < k["requests"] / k["accounts"], kind
    # 20 held-out users, calibrated to 1% per account-day over ~3 days: a handful at most
    assert det["benign"]["flagged"] <= 3


def test_live_act_escalates_the_distiller_and_never_touches_users(report):
    ledger = report["live"]["ledger"]
    d = ledger[DISTILLER]
    assert d["requests"] == SMALL["extract"]  # the ledger holds every request, exactly once
    assert d["suspect_from_request"] is not None
    assert d["suspect_from_request"] < d["extracting_from_request"] <= d["canary_from_request"]
    assert d["canary_requests"] > 0
    for name, e in ledger.items():
        if name != DISTILLER:
            assert e["requests"] == SMALL["user_requests"]
            assert e["statuses"] == {200: SMALL["user_requests"]}
            assert (
                e["suspect_from_request"],
                e["extracting_from_request"],
                e["canary_requests"],
            ) == (None, None, 0)
    levels = {(v["account_id"], v["level"]) for v in report["live"]["verdicts"]["data"]}
    assert {a for a, _ in levels} == {DISTILLER}
    assert report["live"]["harvest"]["failed"] == {}


def test_trace_act_names_no_wrong_account_and_nobody_for_the_controls(report):
    tr = report["trace"]
    # On the tiny random teacher the watermark's evidence in the distiller's 96 answers of 32 tokens
    # is weak and varies from run to run (log10 p of its key -7.5, -4.1 and -0.4 in three runs), so
    # here only no *other* account may be named; that served answers trace to their account is
    # asserted with the bundled teacher in tests/watermark/test_serve_synthid.py, and the demo's
    # own run on it is in the README (p = 1e-57 for the distiller's dataset).
    assert set(tr["distiller_received"]["traced"]) <= {DISTILLER}
    assert set(tr["distiller_data"]["traced"]) <= {DISTILLER}
    assert tr["other_model"]["traced"] == []  # text the teacher never wrote: no key fires
    for name, t in tr["users"].items():
        assert DISTILLER not in t["traced"], name
        assert t["traced"] in ([], [name])


def test_student_act_runs_the_canary_test_with_its_control(report):
    st = report["student"]
    assert st["train"]["steps"] > 0
    # the untrained student never saw a canary: under the null its mean rank is ~25.5 of 50
    untrained = st["untrained_student"]
    assert untrained["traced"] == []
    assert [a["account"] for a in untrained["accounts"]] == [DISTILLER]
    written = json.loads((Path(report["config"]["out"]) / "demo.json").read_text())
    assert written["student"]["untrained_student"] == untrained


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="--cal-accounts"):
        DemoConfig(out=tmp_path, cal_accounts=5)
    with pytest.raises(ConfigError, match="--extract"):
        DemoConfig(out=tmp_path, extract=0)
    r = run_cli("demo", "--target-fpr", "2", "-o", str(tmp_path))
    assert r.returncode == 2 and "--target-fpr" in r.stderr
    assert not any(tmp_path.iterdir())
