"""The CLI's output is its own: other libraries' log lines and progress bars (transformers'
"Loading weights" bar, sentence-transformers' INFO lines) appear only with ``-v``. ``detect``
is the quickest command that loads a Hugging Face model (the MiniLM prompt embedder)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess

import pytest

from distillguard.serve.process import distillguard_command
from tests.detect.synth import benign_account, bulk_account

# a log line of a library (not distillguard's own), in the CLI's format or transformers' own
LIBRARY_LOG = re.compile(r"^(\S+ \S+ (DEBUG|INFO) (?!distillguard)\S+: |\[transformers\] )", re.M)
BAR = re.compile(r"\d+/\d+ \[[^\]]*it/s\]|Loading weights")


@pytest.fixture(scope="module")
def detect_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("logging")
    rng = random.Random(0)
    cal = [r for i in range(30) for r in benign_account(rng, f"b{i}", days=2)]
    traffic = [r for i in range(5) for r in benign_account(rng, f"e{i}")]
    traffic += bulk_account(rng, "bot", 100)
    for name, records in (("cal.jsonl", cal), ("traffic.jsonl", traffic)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ("detect", "-t", str(d / "traffic.jsonl"), "--calibrate", str(d / "cal.jsonl"), "--json")
    # a user's own settings of these would decide the outcome, not the CLI
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TQDM_"))
    }
    return {
        flag: subprocess.run(
            distillguard_command(*([flag] if flag else []), *args),
            capture_output=True,
            text=True,
            timeout=600,
            env={**env, "COLUMNS": "200"},
        )
        for flag in ("", "-v")
    }


def test_without_v_only_the_commands_own_output(detect_runs):
    quiet = detect_runs[""]
    assert quiet.returncode == 0, quiet.stderr
    assert not LIBRARY_LOG.search(quiet.stderr), quiet.stderr[:2000]
    assert not BAR.search(quiet.stderr), quiet.stderr[:2000]
    report = json.loads(quiet.stdout)  # stdout is the report and nothing else
    assert "bot" in {a["account"] for a in report["accounts"]}


def test_v_shows_the_libraries_and_changes_no_result(detect_runs):
    loud = detect_runs["-v"]
    assert loud.returncode == 0, loud.stderr
    # the same checks that pass on the quiet run fail here: they can tell the two apart
    assert LIBRARY_LOG.search(loud.stderr) and BAR.search(loud.stderr)
    assert "sentence_transformers" in loud.stderr
    assert json.loads(loud.stdout) == json.loads(detect_runs[""].stdout)
