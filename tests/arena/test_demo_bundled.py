"""``distillguard demo`` on the bundled teacher (SmolLM2-135M) at the smallest sizes where its
positive results hold, asserted with its controls: the distiller's received answers and its
curated dataset trace to the distiller's watermark key alone (Holm over accounts), the student
trained on that dataset traces to the distiller by its canaries while the untrained student does
not, the one forensics report says "distilled" (combined p < 1e-3) and names the distiller, the
API-only canary test traces the student served by ``serve --no-guard`` and not its control, and
the student is closer to the teacher than its control on prompts nobody sent.

The tiny demo (tests/arena/test_demo.py) can assert only the controls: a random teacher's
watermark is too weak in a few short answers. This one takes tens of minutes on a 2-core machine
(docs/arena.md gives a measured run), too long for CI's budget, so it runs only when asked:

    DISTILLGUARD_HEAVY_TESTS=1 .venv/bin/python -m pytest tests/arena/test_demo_bundled.py

The sizes, reasoned from the default run (bench/results/demo.json, 1,226 s):

- ``max_tokens`` 64: the default run's own answers re-tested as if capped there keep 8-10
  finished answers in 64-96 requests, whose distiller key's log10 p is about -21 (Holm at 1e-3
  over 4 accounts needs about -3.6); at 48 it falls to -6 to -9, too close for one run.
- ``extracting_after`` 3 and ``extract`` 80: the distiller is flagged near its 25th-29th
  request; canaries (25% of answers from 'extracting' on) then come from ~45 requests, about 11
  expected (4 or more with probability 0.998), where 3 ranked first already give p < 1e-3 with
  49 decoys. The default run's student ranked all 8 of its canaries first after 6 epochs.
- act 1 at the tiny demo's sizes (the distiller is flagged there too), 3 users asking 2 each,
  8 requests in flight (the engine batches them), the default student (``prune:8``, 6 epochs).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from distillguard.arena.demo import DISTILLER
from distillguard.serve.process import distillguard_command
from tests.arena.test_demo import NULL_LOG10_P, assert_demo_json_shape

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("DISTILLGUARD_HEAVY_TESTS") != "1",
        reason="the demo on the bundled teacher takes tens of minutes on 2 cores (docs/arena.md), "
        "too long for CI; run it with DISTILLGUARD_HEAVY_TESTS=1 .venv/bin/python -m pytest "
        "tests/arena/test_demo_bundled.py",
    ),
    pytest.mark.timeout(3600),
]

SIZES = dict(
    model="smollm2",
    cal_accounts=40,
    eval_accounts=20,
    campaign_requests=150,
    users=3,
    user_requests=2,
    extract=80,
    max_tokens=64,
    extracting_after=3,
    concurrency=8,
    student="prune:8",
    epochs=6.0,
    quality_prompts=8,
)
ALPHA = 1e-3  # the demo's level for tracing and for the canary test


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo-bundled")
    options = [a for k, v in SIZES.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    run = subprocess.run(
        distillguard_command("demo", *options, "-o", str(out), "--json"),
        capture_output=True,
        text=True,
        timeout=3500,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_it_ran_at_these_sizes_with_demo_json_in_shape(report):
    assert_demo_json_shape(report)
    assert {k: report["config"][k] for k in SIZES} == SIZES
    d = report["live"]["ledger"][DISTILLER]
    # the distiller reached 'extracting' and was served canaries (its request count is not
    # pinned: on a loaded machine a request can outlast the harvest's timeout and be sent again,
    # the ledger then holding a 499 and its retry)
    assert d["extracting_from_request"] is not None and d["canary_requests"] > 0
    for name, e in report["live"]["ledger"].items():
        if name != DISTILLER:  # no user was touched by the policy
            assert (e["suspect_requests"], e["canary_requests"]) == (0, 0), name


def test_the_distillers_received_answers_and_dataset_trace_to_it_alone(report):
    tr = report["trace"]
    for what in ("distiller_received", "distiller_data"):
        assert tr[what]["traced"] == [DISTILLER], (what, tr[what])
        assert tr[what]["log10_p"][DISTILLER] < -3, (what, tr[what])
    # controls: another model's text traces to nobody; a user's answers never to the distiller
    assert tr["other_model"]["traced"] == []
    for name, t in tr["users"].items():
        assert set(t["traced"]) <= {name}, (name, t)
        assert t["log10_p"][DISTILLER] > NULL_LOG10_P, (name, t)


def test_the_student_traces_to_the_distiller_by_canaries_and_its_control_does_not(report):
    st = report["student"]
    assert st["student"]["traced"] == [DISTILLER]
    (mine,) = [a for a in st["student"]["accounts"] if a["account"] == DISTILLER]
    assert mine["p_holm"] < ALPHA
    assert st["untrained_student"]["traced"] == []
    assert all(a["p_holm"] > 10**NULL_LOG10_P for a in st["untrained_student"]["accounts"])


def test_the_forensics_report_says_distilled_and_names_the_distiller(report):
    """Issue 27's must-be-true: the one report on a student distilled from the watermarked
    bundled teacher says distilled, combined p < 1e-3, and names the leaking account; the
    control (the untrained student) is traced by none of its exact tests."""
    f = report["forensics"]
    assert f["verdict"] == "distilled", f
    assert f["combined_p"] < ALPHA
    assert f["traced"] == [DISTILLER]
    assert f["control"]["traced"] == [] and f["control"]["distilled"] is False
    assert f["control"]["combined_p"] > 10**NULL_LOG10_P


def test_the_api_canary_test_traces_the_served_student_and_not_its_control(report):
    """Issue 27's must-be-true: the demo's student served by `distillguard serve --model DIR
    --no-guard` is traced as a suspect URL by the API-only canary test; its control is not."""
    api = report["forensics"]["api_canaries"]
    assert api["ran"], api["why_not"]
    student, control = api["student"], api["untrained_student"]
    assert student["scoring"] == control["scoring"] == "likelihood"
    assert student["traced"] == [DISTILLER]
    (mine,) = [a for a in student["accounts"] if a["account"] == DISTILLER]
    assert mine["p_holm"] < ALPHA
    assert control["traced"] == []
    assert all(a["p_holm"] > 10**NULL_LOG10_P for a in control["accounts"])
    assert api["verdict"] == "distilled"


def test_the_student_learned_from_the_teacher_on_prompts_nobody_sent(report):
    q = report["quality"]
    assert q["prompts"] == SIZES["quality_prompts"]
    # an untrained pruned student is worse than uniform; SFT on the teacher's answers must move
    # it towards the teacher, which stays the floor
    assert q["teacher"]["nll"] < q["student"]["nll"] < q["untrained_student"]["nll"]
    assert (Path(report["config"]["out"]) / "report.html").is_file()
