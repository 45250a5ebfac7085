"""Help and tables through a pipe are whole: off a terminal rich assumed 80 columns, so typer's
help boxes cut option names ("--served-model-na…") and tables cropped their cells ("acme…").
The same commands with COLUMNS=80 show the cut, so these tests can fail."""

from __future__ import annotations

import os
import subprocess

import pytest

from distillguard.serve.process import distillguard_command


def run(*args: str, columns: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns:
        env["COLUMNS"] = columns
    return subprocess.run(
        distillguard_command(*args), capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize(
    "command,option,help_text",
    [
        (("serve",), "--served-model-name", "model id clients"),
        (("serve",), "--default-max-tokens", "completion cap"),
        (("arena", "traffic"), "--whole-conversations", "--no-whole-conversations"),
        (("distill", "train"), "--student", "student"),
    ],
)
def test_help_through_a_pipe_is_not_cut(command, option, help_text):
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    rows = [ln for ln in proc.stdout.splitlines() if f" {option} " in ln]
    assert rows and help_text in rows[0], proc.stdout
    assert "…" in run(*command, "--help", columns="80").stdout  # what a pipe got before


def test_a_table_through_a_pipe_is_not_cut(tmp_path):
    db = str(tmp_path / "ledger.db")
    accounts = ("acme-labs-research-division", "bystander-with-a-long-name")
    for account in accounts:
        made = run("keys", "create", "--account", account, "--rpm", "60", "--db", db)
        assert made.returncode == 0, made.stderr
    listed = run("keys", "list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    for account in accounts:
        assert account in listed.stdout
    for header in ("concurrent", "daily tokens", "status"):
        assert header in listed.stdout
    # the only ellipsis left is the key prefix's own ("dg-vsQxt…": the key is never shown)
    assert all(line.count("…") <= 1 for line in listed.stdout.splitlines())
    narrow = run("keys", "list", "--db", db, columns="80").stdout
    assert not any(account in narrow for account in accounts)


def test_a_long_error_message_stays_on_one_line(tmp_path):
    deep = tmp_path / ("a-directory-with-a-long-name-" * 4) / "traffic.jsonl"
    deep.parent.mkdir(parents=True)
    deep.write_text('{"ts": 1, "account": "a", "request": {}}\n{"ts": 2,\n')
    proc = run("detect", "--traffic", str(deep), "--calibrate", str(deep))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{deep}:2: not valid JSON" in proc.stderr
