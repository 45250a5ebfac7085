"""The tree is ruff-clean and ruff-formatted (rules in pyproject.toml's [tool.ruff])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(args):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, (
        f"ruff {' '.join(args)} failed (fix with `ruff check --fix . && ruff format .`):\n"
        + proc.stdout[-4000:]
        + proc.stderr[-2000:]
    )
