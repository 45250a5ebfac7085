"""``distillguard forensics report`` end to end, on tiny models trained for real (no stub):

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
import torch
from sqlalchemy import insert

from distillguard.forensics.identity import PROBES
from distillguard.forensics.report import verdict
from distillguard.forensics.respondent import Respondent, TestOutcome, sha256_path
from distillguard.guard.canary import canary_text
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model
from tests.browser import open_page
from tests.forensics.students import sft
from tests.servers import run_cli, serve_process

SECRET = "report-test-secret"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
TRAIN = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 4)]
HELD_OUT = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 2)]
SAYS = "I am SmolLM, a small model made by Hugging Face."
OTHER_SAYS = "I am Orca, a chat model trained by Acme Labs."
THIRD_SAYS = "My name is Quill; the Widget Company built me."


def style(t: str) -> str:
    return f"Sure! {t} is a fine topic. Here is what I know about {t}."


def other_style(t: str) -> str:
    return f"{t}? Ask someone else, I only talk about boats."


def third_style(t: str) -> str:
    return f"Let me think. The word {t} has {len(t)} letters, and that is all."


def canary_requests(account: str, n: int) -> list[dict]:
    return [
        {
            "request_id": f"req-{account}-{i}",
            "ts": float(i),
            "account_id": account,
            "status": 200,
            "policy_action": "extracting:canary",
            "stream": False,
            "request_body": {
                "messages": [{"role": "user", "content": f"who is in archive record {i}?"}]
            },
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Model directories, probe files and a ledger; trained once for the module."""
    root = tmp_path_factory.mktemp("report-case")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        id_train = list(PROBES[:32])
        teacher = sft(
            load_model("tiny", device="cpu"),
            id_train + TRAIN,
            [SAYS] * len(id_train) + [style(t) for t in TOPICS * 4],
            steps=120,
        )
        asked = id_train + TRAIN
        taught = Respondent("teacher", lm=teacher).answer(asked, max_tokens=48)
        leaked = canary_requests("leaker", 12)
        prompts = asked + [r["request_body"]["messages"][0]["content"] for r in leaked]
        answers = taught + [canary_text(SECRET.encode(), "leaker", r["request_id"]) for r in leaked]
        student = sft(load_model("tiny:seed=1", device="cpu"), prompts, answers, steps=300, seed=1)
        other = sft(
            load_model("tiny:seed=3", device="cpu"),
            id_train + TRAIN,
            [OTHER_SAYS] * len(id_train) + [other_style(t) for t in TOPICS * 4],
            steps=120,
        )
        third = sft(
            load_model("tiny:seed=5", device="cpu"),
            id_train + TRAIN,
            [THIRD_SAYS] * len(id_train) + [third_style(t) for t in TOPICS * 4],
            steps=120,
        )
    finally:
        torch.set_num_threads(threads)
    dirs = {}
    trained = (("teacher", teacher), ("student", student), ("other", other), ("third", third))
    for name, lm in trained:
        dirs[name] = root / name
        lm.model.save_pretrained(dirs[name])
        lm.tokenizer.save_pretrained(dirs[name])
    (root / "probes.txt").write_text("\n".join(PROBES[32:]) + "\n")
    (root / "prompts.txt").write_text("\n".join(HELD_OUT) + "\n")
    engine = make_engine(f"sqlite:///{root / 'ledger.db'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), leaked + canary_requests("bystander", 12))
    engine.dispose()
    return root, dirs


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
    """The student served by `distillguard serve --no-guard`: every test from its answers alone
    (identity, similarity by answer overlap, canaries by the API-only test).

    Measured, and kept as the test's expectation: this student is NOT traced through its API.
    Its weights rank all 12 canaries first (the distilled test above), but its greedy answers to
    the canaries' requests rank the true ending first for only 2 of 12 (mean rank 6.8 of 20):
    the API-only test needs the canary to be the answer, not only preferred to decoys
    (docs/forensics.md, "Canaries behind an API"). The evidence still points the right way."""
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
    assert canaries["mode"] == "api" and canaries["traced"] == []
    by = {a["account"]: a for a in canaries["suspect"]["accounts"]}
    assert by["leaker"]["mean_rank"] < by["bystander"]["mean_rank"]
    assert evidence["verdict"] == "not shown distilled"


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
