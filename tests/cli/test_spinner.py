"""Spinners off a terminal (issue 28): rich's ``Console.status`` ("loading model ...") draws
nothing when stderr is a pipe or a file, so a user in CI or under nohup saw a silent wait. Now a
command prints a line when the wait starts and the time it took when it ends, as progress does
(``distillguard.progress``)."""

from __future__ import annotations

import io
import re

import pytest

from distillguard.progress import LogStatus, StatusConsole
from tests.servers import run_cli


def test_a_command_says_what_it_waits_for_when_stderr_is_a_pipe(tmp_path):
    answer = tmp_path / "answer.txt"
    answer.write_text("a short answer to test")
    proc = run_cli(  # capture_output: stderr is a pipe, as in CI
        "watermark",
        "detect",
        "-f",
        str(answer),
        "--account",
        "acme",
        "--teacher",
        "tiny",
        env={"DISTILLGUARD_WATERMARK_SECRET": "spinner-test-secret"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    start = lines.index("loading teacher 'tiny' ...")  # before the wait
    assert re.fullmatch(r"loading teacher 'tiny': done in \d+(s|m\d\ds)", lines[start + 1]), lines
    assert "traced to:" in proc.stdout  # the result came after


def _console() -> tuple[StatusConsole, io.StringIO]:
    out = io.StringIO()
    return StatusConsole(file=out, width=200), out


def test_updates_are_lines_and_an_error_adds_none():
    console, out = _console()
    assert not console.is_terminal
    with console.status("[bold]forensics report[/] ...") as status:
        status.update("identity probes ...")
        status.update("identity probes ...")  # unchanged: no second line
        status.update(spinner="dots")  # a spinner-only change: nothing to say
    with pytest.raises(ValueError), console.status("loading 'x' ..."):
        raise ValueError("no such model")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[:2] == ["forensics report ...", "identity probes ..."]
    assert re.fullmatch(r"forensics report: done in \d+s", lines[2]), lines
    assert lines[3] == "loading 'x' ..."  # then the error's own line, not a second one


def test_a_terminal_keeps_rich_spinner():
    console = StatusConsole(file=io.StringIO(), force_terminal=True)
    with console.status("loading ...") as status:
        assert not isinstance(status, LogStatus)
