"""Progress off a terminal: rich's bars drew nothing until the end when stderr was a file or a
pipe (CI, nohup, notebooks), so `eval` was silent for 100 s and `harvest` for minutes. Now such
a command prints a plain line per task every DISTILLGUARD_PROGRESS_INTERVAL seconds and when it
finishes; 0 prints one at every step, which the tests use so that nothing here is timed."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess

import pytest
from rich.console import Console
from rich.progress import Progress

from distillguard.errors import ConfigError
from distillguard.progress import INTERVAL_ENV, LogProgress, _Task, line, make_progress
from distillguard.serve.process import distillguard_command
from tests.detect.synth import benign_account, bulk_account

LINE = re.compile(r"^(calibrating|scoring): ([\d,]+)/([\d,]+) \((\d+)%\)", re.M)


def _detect(tmp_path, interval: str | None) -> subprocess.CompletedProcess:
    rng = random.Random(0)
    cal = [r for i in range(30) for r in benign_account(rng, f"b{i}", days=2)]
    traffic = [r for i in range(4) for r in benign_account(rng, f"e{i}")]
    traffic += bulk_account(rng, "bot", 60)
    for name, records in (("cal.jsonl", cal), ("traffic.jsonl", traffic)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {k: v for k, v in os.environ.items() if k != INTERVAL_ENV}
    if interval is not None:
        env[INTERVAL_ENV] = interval
    args = ("-t", str(tmp_path / "traffic.jsonl"), "--calibrate", str(tmp_path / "cal.jsonl"))
    return subprocess.run(
        distillguard_command("detect", *args, "--detectors", "volume,timing", "--json"),
        capture_output=True,  # stderr is a pipe, as in CI
        text=True,
        timeout=300,
        env=env,
    )


def test_a_piped_command_prints_progress_lines(tmp_path):
    proc = _detect(tmp_path, "0")
    assert proc.returncode == 0, proc.stderr
    found = [
        (n, int(d.replace(",", "")), int(t.replace(",", "")))
        for n, d, t, _ in LINE.findall(proc.stderr)
    ]
    calibrating = [d for n, d, _ in found if n == "calibrating"]
    scoring = [(d, t) for n, d, t in found if n == "scoring"]
    # a line at each step calibrate() reports, in order; scoring advances once, to its total
    assert len(calibrating) > 1 and calibrating == sorted(set(calibrating)), proc.stderr
    n = len((tmp_path / "traffic.jsonl").read_text().splitlines())
    assert scoring == [(n, n)], proc.stderr
    assert re.search(rf"^scoring: {n}/{n} \(100%\), .*done in \d+s$", proc.stderr, re.M)
    assert json.loads(proc.stdout)["accounts"]  # stdout still holds only the report


def test_the_default_interval_still_reports_where_each_task_got(tmp_path):
    proc = _detect(tmp_path, None)  # 10 s, longer than this run: one line per task, at its end
    assert proc.returncode == 0, proc.stderr
    found = LINE.findall(proc.stderr)
    assert [n for n, *_ in found] == ["calibrating", "scoring"], proc.stderr
    n = str(len((tmp_path / "traffic.jsonl").read_text().splitlines()))
    assert found[1][1:] == (n, n, "100")


def test_a_bad_interval_is_a_clear_error(tmp_path):
    proc = _detect(tmp_path, "soon")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{INTERVAL_ENV}='soon'" in proc.stderr


# ---- the factory and the line, in process ------------------------------------------------


def test_a_terminal_gets_rich_bars_and_anything_else_lines(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    assert isinstance(
        make_progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress
    )
    buf = io.StringIO()
    logs = make_progress(console=Console(file=buf))
    assert isinstance(logs, LogProgress)
    with logs as p:  # the calls the project's call sites make
        t = p.add_task("[bold]train", total=4, completed=1, loss="-")
        p.update(t, completed=2, loss="2.345")
        p.advance(t, 2)
        u = p.add_task("eval", total=None, what="")
        p.update(u, completed=3, total=None, what="teacher")
    out = buf.getvalue().splitlines()
    assert out[0].startswith("train: 2/4 (50%)") and out[0].endswith("loss 2.345")
    assert out[1].startswith("train: 4/4 (100%)") and "done in" in out[1]
    assert out[2].startswith("eval: 3, ") and "so far" in out[2] and out[2].endswith("what teacher")
    assert len(out) == 3  # nothing repeated at the end: each task's last state was shown


def test_a_long_interval_prints_only_at_the_end(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    buf = io.StringIO()
    with make_progress(console=Console(file=buf)) as p:
        t = p.add_task("harvest", total=600)
        for _ in range(120):
            p.advance(t)
    assert buf.getvalue().splitlines() == [line_of(buf.getvalue())]
    assert buf.getvalue().startswith("harvest: 120/600 (20%), ")


def line_of(text: str) -> str:
    return text.splitlines()[-1]


def test_the_line_states_rate_and_eta():
    task = _Task("harvest", 600, 120, {"tokens": 15360, "usd": 0.0}, started=0.0)
    assert line(task, now=40.0) == "harvest: 120/600 (20%), 3/s, ETA 2m40s, tokens 15,360, usd 0"
    task.completed = 600
    assert (
        line(task, now=200.0) == "harvest: 600/600 (100%), 3/s, done in 3m20s, tokens 15,360, usd 0"
    )
    slow = _Task("train", 10, 1, {}, started=0.0)
    assert line(slow, now=60.0) == "train: 1/10 (10%), 1/min, ETA 9m00s"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_intervals_are_refused(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(ConfigError, match=INTERVAL_ENV):
        make_progress(console=Console(file=io.StringIO()))
