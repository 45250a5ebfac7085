"""``distillguard forensics report`` end to end, on tiny models trained for real (no stub; built
in tests/forensics/report_case.py, shared with the API-only canary test):

- the teacher: a tiny model fine-tuned to say it is SmolLM by Hugging Face and to answer in one
  style;
- the suspect: another tiny model fine-tuned on the teacher's greedy answers, and on the canary
  answers the gateway served to one account ("leaker"), recorded in a SQLite ledger;
- controls: an untrained tiny model, and one fine-tuned on another identity and style.

The CLI runs in a subprocess; the report it writes is opened in headless Chromium (Debian's
``chromium``, driven over the DevTools protocol on a pipe: no extra package), which must render
it without console errors and show the numbers of evidence.json; its screenshot is saved in the
test's tmp dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillguard.forensics.report import verdict
from distillguard.forensics.respondent import TestOutcome, sha256_path
from tests.browser import open_page
from tests.forensics.report_case import ONE_THREAD, SECRET
from tests.servers import run_cli, serve_process


@pytest.fixture(scope="module")
def case(report_case):
    """Model directories, probe files and a ledger (tests/forensics/report_case.py), trained once
    for the session."""
    return report_case


def report(case, out: Path, suspect: str, *controls: str, tests: str, ledger: bool = True):
    root, dirs = case
    args = ["forensics", "report", "--suspect", suspect, "--teacher", str(dirs["teacher"])]
    for c in controls:
        args += ["--controls", c]
    args += ["--probes", str(root / "probes.txt"), "--prompts", str(root / "prompts.txt")]
    args += ["--limit", "16", "--max-tokens", "32", "--decoys", "19", "--device", "cpu"]
    args += ["--tests", tests, "--out", str(out)]
    if ledger:
        args += ["--ledger", str(root / "ledger.db")]
    run = run_cli(
        *args,
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "evidence.json").read_text())


@pytest.fixture(scope="module")
def distilled(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-distilled")
    _, dirs = case
    evidence = report(
        case,
        out,
        str(dirs["student"]),
        "tiny:seed=2",
        str(dirs["other"]),
        tests="identity,similarity,radioactivity,canaries",
    )
    return out, evidence


def by_name(evidence: dict) -> dict:
    return {t["name"]: t for t in evidence["tests"]}


def test_the_distilled_student_is_reported_distilled_and_traced(case, distilled):
    _, dirs = case
    out, evidence = distilled
    tests = by_name(evidence)
    assert evidence["verdict"] == "distilled" and evidence["combined_p"] < 1e-3
    # the student claims SmolLM / Hugging Face on 9 of the 16 held-out probes, the controls on
    # none; it is above both controls on both fingerprints, which two controls put at p = 1/3
    identity, similarity = tests["identity"], tests["similarity"]
    assert identity["statistic"] >= 0.4 and identity["details"]["fisher_p"] < 1e-4
    assert similarity["details"]["permutation_p"] < 1e-3
    for t in (identity, similarity):
        assert not t["within_controls_range"] and t["p_value"] == pytest.approx(1 / 3)
    assert evidence["significant_tests"] == ["canaries"]
    assert tests["canaries"]["details"]["traced"] == ["leaker"]
    assert tests["canaries"]["p_holm"] < 1e-3
    # the student never saw watermarked text: radioactivity ran and traces nobody
    assert tests["radioactivity"]["could_run"] and tests["radioactivity"]["details"]["traced"] == []
    # every input hashed, every number with its command
    models = evidence["inputs"]["models"]
    assert models["suspect"]["files_sha256"] == sha256_path(dirs["student"])
    assert len(models["controls"]) == 2 and all(
        "weights_sha256" in m for m in models["controls"].values()
    )
    export = out / evidence["inputs"]["ledger_export"]["path"]
    assert evidence["inputs"]["ledger_export"]["sha256"] == sha256_path(export)
    assert "secret_sha256" in evidence["inputs"] and SECRET not in json.dumps(evidence)
    for t in evidence["tests"]:
        assert t["command"].startswith(
            "DISTILLGUARD_WATERMARK_SECRET=... distillguard forensics report"
        )
        assert f"--tests {t['name']} " in t["command"]


def test_a_control_as_suspect_is_not_called_distilled(case, tmp_path):
    """A model trained on non-teacher data, against controls of both kinds (untrained, and
    trained on other non-teacher data: text of any kind looks more like the teacher's than
    random weights' does, so untrained controls alone would call it similar)."""
    _, dirs = case
    evidence = report(
        case,
        tmp_path,
        str(dirs["other"]),
        "tiny:seed=2",
        str(dirs["third"]),
        tests="identity,similarity,canaries",
    )
    assert evidence["verdict"] == "not shown distilled", json.dumps(evidence["p_holm"])
    # it answers more like the teacher than both controls do, by more than probe noise: only
    # its rank among the controls as models keeps that from reading as evidence
    similarity = by_name(evidence)["similarity"]
    assert similarity["details"]["permutation_p"] < 1e-3 and similarity["p_value"] == pytest.approx(
        1 / 3
    )
    assert by_name(evidence)["canaries"]["details"]["traced"] == []


def test_a_suspect_behind_an_api_is_reported_from_its_answers(case, tmp_path):
    """The student served by `distillguard serve --no-guard`: every test from its API alone
    (identity, similarity by answer overlap, canaries by the API-only test).

    Its endpoint gives prompt logprobs (/v1/completions, echo), so the canaries are scored by
    its likelihood of each answer written in the teacher's chat template: the weights test's
    statistic, and its result (all 12 ranked first). Its greedy answers alone ranked the true
    ending first for only 2 of 12 (p 0.08): that fallback would not trace it
    (docs/forensics.md, "Canaries behind an API")."""
    _, dirs = case
    with serve_process("--model", str(dirs["student"]), "--no-guard", env=ONE_THREAD) as url:
        evidence = report(
            case,
            tmp_path,
            url,
            "tiny:seed=2",
            str(dirs["other"]),
            tests="identity,similarity,canaries",
        )
    tests = by_name(evidence)
    assert evidence["inputs"]["models"]["suspect"] == {"spec": url, "url": url}
    assert tests["similarity"]["details"]["mode"] == "answer-overlap"
    assert tests["identity"]["statistic"] >= 0.4 and not tests["identity"]["within_controls_range"]
    canaries = tests["canaries"]["details"]
    assert canaries["mode"] == "api" and canaries["scoring"] == "likelihood"
    assert canaries["traced"] == ["leaker"]
    by = {a["account"]: a for a in canaries["suspect"]["accounts"]}
    assert by["leaker"]["top1"] == 12 and by["bystander"]["p_holm"] > 0.01
    assert evidence["verdict"] == "distilled" and evidence["significant_tests"] == ["canaries"]


def test_without_controls_or_ledger_it_says_what_could_not_run(case, tmp_path):
    _, dirs = case
    evidence = report(case, tmp_path, str(dirs["student"]), tests="identity,canaries", ledger=False)
    tests = by_name(evidence)
    assert evidence["verdict"] == "no test could run"
    assert "no controls" in tests["identity"]["why_not"]
    assert "--ledger" in tests["canaries"]["why_not"]


def test_the_verdict_never_says_distilled_within_the_controls_range():
    def outcome(name, stat, p, controls):
        return TestOutcome(name, could_run=True, statistic=stat, p_value=p, controls=controls)

    # tiny p-values, but a control scores as high as the suspect on every test
    inside = [outcome("a", 0.5, 1e-9, {"c": 0.5}), outcome("b", 0.2, 1e-12, {"c": 0.1, "d": 0.3})]
    assert verdict(inside, 1e-3)["verdict"] == "not shown distilled"
    above = [outcome("a", 0.9, 1e-9, {"c": 0.5}), outcome("b", 0.2, 0.5, {"c": 0.3})]
    got = verdict(above, 1e-3)
    assert got["verdict"] == "distilled" and got["significant_tests"] == ["a"]
    assert got["combined_p"] == pytest.approx(2e-9)  # Holm over 2 tests
    assert verdict([TestOutcome("a", could_run=False)], 1e-3)["verdict"] == "no test could run"


# ---- the page, in a real browser ---------------------------------------------------------------


def test_report_html_renders_in_chromium_and_shows_the_evidence(distilled, tmp_path):
    out, evidence = distilled
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    screenshot = tmp_path / "report.png"
    page, errors = open_page(out / "report.html", tmp_path / "profile", screenshot)
    assert errors == []
    assert page["images"] and all(page["images"])  # every embedded plot decoded
    shown = page["keys"]
    assert shown["verdict"] == evidence["verdict"]
    assert float(shown["combined_p"]) == float(f"{evidence['combined_p']:.3g}")
    assert float(shown["alpha"]) == evidence["alpha"]
    for t in evidence["tests"]:
        for field in ("statistic", "p_value", "p_holm"):
            assert float(shown[f"{t['name']}.{field}"]) == float(f"{t[field]:.3g}"), (
                t["name"],
                field,
            )
    assert screenshot.stat().st_size > 10_000  # a page was drawn, not a blank
