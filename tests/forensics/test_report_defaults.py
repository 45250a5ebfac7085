"""The report's default controls (forensics/controls.py): read from the suspect's own training
record, the non-teacher control trained for real by ``distill train``'s trainer and cached.

A tiny suspect trained by the real trainer (so it has a train_summary.json); the CLI in a
subprocess for the user's path, ``run_report`` in-process for the rest.
"""

from __future__ import annotations

import json

import pytest

from distillguard.distill.curate import save_dataset
from distillguard.distill.train import TrainConfig, train
from distillguard.forensics.controls import (
    KIND_OTHER_DATA,
    KIND_UNTRAINED,
    ControlRecipe,
    suspect_origin,
)
from distillguard.forensics.identity import PROBES
from distillguard.forensics.report import ReportConfig, run_report
from distillguard.forensics.respondent import sha256_path
from tests.servers import run_cli

PROMPTS = [f"tell me about topic {i}" for i in range(8)]


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A tiny student trained from ``tiny:seed=1`` on answers of one style."""
    root = tmp_path_factory.mktemp("defaults-suspect")
    rows = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": p}],
            "response": f"I am SmolLM. Topic {i} is a fine topic.",
        }
        for i, p in enumerate(PROMPTS * 4)
    ]
    save_dataset(rows, [], root / "data")
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "suspect"),
            student="tiny:seed=1",
            teacher="tiny",
            loss="sft",
            epochs=1,
            save_steps=0,
        )
    )
    return root / "suspect"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLGUARD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cli_uses_the_suspects_untrained_student_and_a_non_teacher_student(
    suspect, cache, tmp_path
):
    args = ["forensics", "report", "--suspect", str(suspect), "--teacher", "tiny"]
    args += ["--teacher-names", "SmolLM", "--tests", "identity,similarity", "--device", "cpu"]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "probes.txt").write_text("\n".join(PROBES[:8]) + "\n")
    args += ["--probes", str(tmp_path / "probes.txt")]
    args += ["--prompts", str(tmp_path / "prompts.txt"), "--limit", "8", "--max-tokens", "8"]
    env = {"DISTILLGUARD_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    run = run_cli(*args, "--out", str(tmp_path / "r1"), env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    evidence = json.loads((tmp_path / "r1" / "evidence.json").read_text())
    assert evidence["default_controls"] == {"used": True}
    untrained, other = evidence["controls"]
    assert untrained["default"] and untrained["kind"] == KIND_UNTRAINED
    assert untrained["spec"] == "tiny:seed=1"  # what train_summary.json says it started from
    assert other["default"] and other["kind"] == KIND_OTHER_DATA and not other["cached"]
    assert other["recipe"] == json.loads(json.dumps(ControlRecipe().__dict__))
    # the trained control is in the cache under its key, and hashed in the evidence
    assert other["spec"] == str(cache / "forensics-controls" / other["cache_key"])
    assert other["sha256"]["files_sha256"] == sha256_path(
        cache / "forensics-controls" / other["cache_key"]
    )
    assert "weights_sha256" in untrained["sha256"]
    record = json.loads(
        (cache / "forensics-controls" / other["cache_key"] / "train_summary.json").read_text()
    )
    assert record["student"] == "tiny:seed=1" and record["examples"] == ControlRecipe().pairs
    # both tests ran against the two defaults; the rerun command relies on the same defaults
    for t in evidence["tests"]:
        assert t["could_run"] and len(t["controls"]) == 2, t
        assert "--controls" not in t["command"] and "--no-default-controls" not in t["command"]
    assert "default control (untrained student): tiny:seed=1" in run.stdout
    # a second report reuses the cached control: same key, same weights
    config = ReportConfig(suspect=str(suspect), teacher="tiny", tests=("similarity",), device="cpu")
    second = run_report(config, tmp_path / "r2", prompts=PROMPTS[:2])["controls"][1]
    assert second["cached"] and second["sha256"] == other["sha256"]
    assert len(list((cache / "forensics-controls").iterdir())) == 1  # no half-built leftovers


def test_no_default_controls_and_given_controls_turn_them_off(suspect, cache, tmp_path):
    def report(**kw):
        config = ReportConfig(
            suspect=str(suspect), teacher="tiny", tests=("similarity",), device="cpu", **kw
        )
        return run_report(config, tmp_path / "out", prompts=PROMPTS[:4])

    off = report(default_controls=False)
    assert off["default_controls"] == {
        "used": False,
        "why_not": "turned off (--no-default-controls)",
    }
    assert off["controls"] == [] and "no controls" in off["tests"][0]["why_not"]
    assert "--no-default-controls" in off["command"]
    given = report(controls=("tiny:seed=7",))
    assert given["default_controls"]["why_not"] == "controls given (--controls)"
    assert [c["spec"] for c in given["controls"]] == ["tiny:seed=7"]
    assert not given["controls"][0]["default"]
    assert not cache.exists()  # nothing was trained


def test_a_suspect_without_a_training_record_gets_none_and_the_report_says_why(
    suspect, cache, tmp_path
):
    config = ReportConfig(
        suspect="tiny:seed=4", teacher="tiny", tests=("similarity",), device="cpu"
    )
    evidence = run_report(config, tmp_path / "out", prompts=PROMPTS[:4])
    assert not evidence["default_controls"]["used"]
    assert "train_summary.json" in evidence["default_controls"]["why_not"]
    assert "No default controls" in (tmp_path / "out" / "report.html").read_text()
    origin, why = suspect_origin("http://127.0.0.1:9/v1")
    assert origin is None and "URL" in why
    # a student the caller built by hand: its recorded spec only names it
    given = tmp_path / "given"
    given.mkdir()
    summary = json.loads((suspect / "train_summary.json").read_text())
    (given / "train_summary.json").write_text(json.dumps({**summary, "student_given": True}))
    origin, why = suspect_origin(str(given))
    assert origin is None and "built by the caller" in why
    # a pruned student's spec is made self-contained with its recorded teacher
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "train_summary.json").write_text(
        json.dumps({**summary, "student": "prune:15:mlp896", "config": {"teacher": "smollm2"}})
    )
    assert suspect_origin(str(pruned))[0].student == "prune:15:mlp896@smollm2"
