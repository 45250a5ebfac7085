"""The actors' walkthroughs (docs/provider.md, docs/distiller.md, docs/investigator.md) run as
written: every ```bash block of a page, top to bottom, in one bash session per page, with only
the variables the pages document set to small sizes and the tiny model.

The pages are one story in one directory: the provider starts the gateway and leaves it running,
acme-labs harvests it and trains a student (the distiller), and the investigator examines the
ledger and the student and stops the gateway. So the three tests share one working directory and
HOME (where the gateway keeps its watermark secret), and a page runs only after the pages before
it passed.

Sybil finds the blocks (fenced code in Markdown, its ``<!-- skip: next -->`` directive for a block
shown but not run); Sybil, pytest-markdown-docs and prysk have no bash evaluator that keeps one
shell across blocks (prysk runs .t files and compares every line of output, which a sampled
answer or a timing cannot match), so :class:`BashSession` is written here: the blocks go to one
long-lived ``bash`` one after another, as a user pastes them into a terminal, and a failing block
is reported with its line in the page and its output.

``bench/journeys.py`` runs the same pages at their documented sizes and times each block.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ("provider", "distiller", "investigator")

# The port the pages serve on in this test: below Linux's ephemeral range, where the other tests'
# servers (port 0, the kernel's pick) never land; the pages document 8000.
PORT = 18437

# The pages' documented variables at sizes CI affords (their real defaults are on the pages);
# nothing else about the pages' commands changes. The tiny model counts bytes as tokens: prompts
# of up to 420 plus 32 answer tokens fit its 512-token context. 175 prompts: ShareGPT's first
# repeated prompt is its 178th (a repeat in flight together with its first has to wait for it:
# one Idempotency-Key), and after acme-labs is flagged and 5 more requests are, about 80 are
# served at 'extracting', a tenth of them canaries (none at all: p = 0.9^80, about 2e-4).
SMALL = {
    "DISTILLGUARD_MODEL": "tiny",
    "PORT": str(PORT),
    "BENIGN_USERS": "40",
    "EXTRACTING_AFTER": "5",
    "N_PROMPTS": "175",
    "MAX_PROMPT_TOKENS": "420",
    "MAX_TOKENS": "32",
    "STUDENT": "prune:1",
    "EPOCHS": "1",
    "EVAL_PROMPTS": "8",
    "FORENSICS_PROMPTS": "8",
}


@dataclass
class Block:
    """One ```bash block of a page: its source and where it starts in the page."""

    source: str
    line: int


@dataclass
class Step:
    """A block as it ran: wall seconds, and its output when it failed."""

    block: Block
    seconds: float
    ok: bool
    output: str


def page_blocks(page: Path) -> list[Block]:
    """The page's ```bash blocks in order, less those a ``<!-- skip: ... -->`` directive skips."""
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, SkipParser

    def collect(example):  # Sybil's evaluator: only collect; BashSession runs them
        example.namespace["blocks"].append(Block(source=str(example.parsed), line=example.line))

    sybil = Sybil(parsers=[CodeBlockParser("bash", collect), SkipParser()], pattern="*.md")
    document = sybil.parse(page)
    document.namespace["blocks"] = []
    for example in document.examples():
        try:
            example.evaluate()
        except unittest.SkipTest:
            pass  # a skipped block: shown on the page, not run
    return document.namespace["blocks"]


class BashSession:
    """One ``bash`` that runs blocks one after another, as a terminal does.

    ``set -euo pipefail``: a failing command ends the session, and its block is reported. Each
    block is sourced from a file with stdin from /dev/null, so a command that reads stdin cannot
    swallow the next block. The session is its own process group: what a page leaves running in
    the background (the gateway) is stopped by :meth:`kill`.
    """

    def __init__(self, cwd: Path, env: dict[str, str], scratch: Path):
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.log_path = scratch / "session.log"
        self.log = open(self.log_path, "wb")  # closed in close()
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.count = 0
        # the ERR trap names the command that ended the session
        self._send(
            "set -euo pipefail\n"
            "trap 'echo \"journey: exit $? at line $LINENO of the block: $BASH_COMMAND\" >&2' ERR\n"
        )

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, block: Block, timeout_s: float) -> Step:
        self.count += 1
        script = self.scratch / f"block{self.count}.sh"
        done = self.scratch / f"block{self.count}.done"
        script.write_text(block.source)
        done.unlink(missing_ok=True)  # a marker left by an earlier session in this scratch
        start_byte = self.log_path.stat().st_size
        t0 = time.perf_counter()
        self._send(f"source {script} </dev/null\n: > {done}\n")
        while not done.exists():
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        ok = done.exists()
        output = self.log_path.read_bytes()[start_byte:].decode(errors="replace")
        if not ok and self.proc.poll() is None:
            output += f"\njourney: no end after {timeout_s:.0f} s"
        return Step(block=block, seconds=seconds, ok=ok, output=output)

    def close(self) -> None:
        """End the shell (EOF), leaving what it started in the background running."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the shell already ended (a failed block)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def kill(self) -> None:
        """Stop the session's process group: the shell and whatever it left in the background."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


def journey_env(home: Path, variables: dict[str, str]) -> dict[str, str]:
    """A new user's environment: this interpreter's bin on PATH, a fresh HOME (so a fresh
    watermark secret), none of the developer's DISTILLGUARD_* or XDG settings, and the pages'
    documented variables."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISTILLGUARD_", "XDG_", "PYTEST_", "COLUMNS", "LINES"))
    }
    bin_dir = str(Path(sys.executable).parent)
    return {
        **keep,
        "HOME": str(home),
        "PATH": bin_dir + os.pathsep + keep.get("PATH", ""),
        **variables,
    }


def run_page(
    page: Path, cwd: Path, env: dict[str, str], scratch: Path, timeout_s: float = 900
) -> tuple[list[Step], BashSession]:
    """Run the page's blocks in one session until one fails; the session is closed, not killed."""
    session = BashSession(cwd, env, scratch)
    steps = []
    try:
        for block in page_blocks(page):
            step = session.run(block, timeout_s)
            steps.append(step)
            if not step.ok:
                break
    finally:
        session.close()
    return steps, session


def failure_message(page: Path, step: Step) -> str:
    rel = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    return (
        f"{rel}:{step.block.line}: this block failed after {step.seconds:.0f} s\n"
        f"--- block ---\n{step.block.source}--- its output (last 6000 characters) ---\n"
        f"{step.output[-6000:]}"
    )


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # as uvicorn binds: a connection of an earlier run in TIME_WAIT does not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """The shared directory, HOME and environment of the three pages, and what each page did.
    At the end every session's process group is stopped, whatever the pages left running."""
    if shutil.which("curl") is None:
        pytest.fail("the walkthroughs use curl; install it")
    if not port_free(PORT):
        pytest.fail(f"port {PORT} is taken: the walkthrough test serves on it (tests/docs)")
    base = tmp_path_factory.mktemp("journeys")
    (base / "home").mkdir()
    (base / "work").mkdir()
    state = {
        "cwd": base / "work",
        "env": journey_env(base / "home", SMALL),
        "scratch": base / "sessions",
        "passed": [],
        "sessions": [],
    }
    yield state
    for session in state["sessions"]:
        session.kill()


def walk(journey, name: str) -> list[Step]:
    before = PAGES[: PAGES.index(name)]
    missing = [p for p in before if p not in journey["passed"]]
    if missing:
        pytest.fail(f"docs/{name}.md continues {', '.join(missing)}.md, which did not pass")
    page = DOCS / f"{name}.md"
    steps, session = run_page(page, journey["cwd"], journey["env"], journey["scratch"] / name)
    journey["sessions"].append(session)
    assert steps, f"{page} has no ```bash blocks to run"
    if not steps[-1].ok:
        pytest.fail(failure_message(page, steps[-1]), pytrace=False)
    journey["passed"].append(name)
    return steps


def test_provider_walkthrough(journey):
    walk(journey, "provider")
    work = journey["cwd"]
    # what the page says the steps leave behind, for the pages after it
    assert (work / "cal.npz").is_file() and (work / "acme-labs.key").is_file()


def test_distiller_walkthrough(journey):
    walk(journey, "distiller")
    assert (journey["cwd"] / "runs" / "s1" / "config.json").is_file()


def test_investigator_walkthrough(journey):
    walk(journey, "investigator")


def test_page_blocks_follow_the_skip_directive(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# t\n\n```bash\necho one\n```\n\n<!-- skip: next -->\n\n```bash\nexit 1\n```\n\n"
        "- a list item:\n\n    ```bash\n    echo two\n    ```\n\n```python\nraise SystemExit\n```\n"
    )
    blocks = page_blocks(page)
    assert [b.source.strip() for b in blocks] == ["echo one", "echo two"]
    assert [b.line for b in blocks] == [3, 15]


def test_a_failing_command_fails_its_block_with_its_output(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\nX=1\necho kept $X\n```\n\n```bash\necho before\nfalse\necho never\n```\n\n"
        "```bash\necho not reached\n```\n"
    )
    env = journey_env(tmp_path / "home", {})
    steps, session = run_page(page, tmp_path, env, tmp_path / "s")
    session.kill()
    assert [s.ok for s in steps] == [True, False]
    assert "kept 1" in steps[0].output
    assert "before" in steps[1].output and "never" not in steps[1].output
    assert "journey: exit 1 at line 2 of the block: false" in steps[1].output
    message = failure_message(page, steps[1])
    assert f"{page}:6: this block failed" in message and "false" in message
