"""Progress that shows wherever the output goes: rich's bars on a terminal, plain lines elsewhere.

Rich draws nothing until the end when its console is not a terminal (CI, nohup, a notebook, a
pipe), so a long command looked hung: ``distill eval`` was silent for 100 s, ``harvest`` for
minutes. :func:`make_progress` returns rich's ``Progress`` on a terminal and otherwise a
:class:`LogProgress` with the calls the project uses (``add_task``, ``update``, ``advance``, the
context manager, ``console``), which prints one line per task every
``DISTILLGUARD_PROGRESS_INTERVAL`` seconds (default 10; 0: at every change, as tests use) and
when a task finishes::

    harvest: 120/600 (20%), 3.1/s, ETA 2m34s, tokens 15,360

Spinners (``Console.status``, "loading model ...") likewise: :class:`StatusConsole` prints a
line when one starts and the time it took when it ends (:class:`LogStatus`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from distillguard.errors import ConfigError

INTERVAL_ENV = "DISTILLGUARD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def progress_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines (a number >= 0; "
            f"0 prints a line at every step, unset means {DEFAULT_INTERVAL_S:g})"
        )
    return value


def make_progress(*columns, console: Console | None = None, transient: bool = False, disable=False):
    """rich's ``Progress(*columns, ...)`` when ``console`` (default: stderr) is a terminal, else a
    :class:`LogProgress` on it; ``disable`` shows nothing either way."""
    from rich.progress import Progress

    console = console or Console(stderr=True)
    if disable or console.is_terminal:
        return Progress(*columns, console=console, transient=transient, disable=disable)
    return LogProgress(console, interval=progress_interval())


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict
    started: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    finished_shown: bool = False
    changed: bool = True


class LogProgress:
    """The subset of rich's ``Progress`` the project uses, as periodic plain lines."""

    def __init__(self, console: Console, *, interval: float = DEFAULT_INTERVAL_S):
        self.console = console
        self.interval = interval
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- rich's Progress API -------------------------------------------------------------
    def __enter__(self) -> LogProgress:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="progress-lines", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._lock:  # where each task got to (an interrupted or open-ended one included)
            for task in self._tasks.values():
                if not task.finished_shown and task.changed:
                    self._show(task)

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed=0,
        **fields,
    ) -> int:
        with self._lock:
            task_id = len(self._tasks)
            self._tasks[task_id] = _Task(
                description, total, completed, fields, start_completed=completed
            )
            return task_id

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields,
    ) -> None:
        fields.pop("visible", None)
        fields.pop("refresh", None)
        with self._lock:
            task = self._tasks[task_id]
            if total is not None:
                task.total = total
            if completed is not None:
                task.completed = completed
            if advance is not None:
                task.completed += advance
            if description is not None:
                task.description = description
            task.fields.update(fields)
            task.changed = True
            done = task.total is not None and task.completed >= task.total
            if (done and not task.finished_shown) or self.interval <= 0:
                self._show(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    # ---- lines ---------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for task in self._tasks.values():
                    if not task.finished_shown:
                        self._show(task)

    def _show(self, task: _Task) -> None:
        self.console.print(line(task), markup=False, highlight=False, soft_wrap=True)
        task.changed = False
        task.finished_shown = task.total is not None and task.completed >= task.total


class LogStatus:
    """rich's ``Console.status`` spinner off a terminal, where rich draws nothing and a user in
    CI or under nohup saw a silent wait ("loading model ..."): one line when it starts, one per
    ``update`` with a new message, and one with the time taken when it ends (unless by an error,
    whose message follows)::

        loading teacher 'smollm2' ...
        loading teacher 'smollm2': done in 12s
    """

    def __init__(self, console: Console, status):
        self.console = console
        self.first = self.status = _plain(status)
        self.started = time.monotonic()

    def __enter__(self) -> LogStatus:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # on an error, nothing: the error's own line comes next and says what happened
        if exc_type is None:
            elapsed = _duration(time.monotonic() - self.started)
            self._print(f"{self.first.rstrip(' .…')}: done in {elapsed}")

    def start(self) -> None:
        self.started = time.monotonic()
        self._print(self.status)

    def stop(self) -> None:
        pass  # rich's Status.stop() clears the spinner; here the lines stay

    def update(self, status=None, **_spinner) -> None:
        if status is not None and _plain(status) != self.status:
            self.status = _plain(status)
            self._print(self.status)

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class StatusConsole(Console):
    """A rich ``Console`` whose ``status()`` spinner is a :class:`LogStatus` off a terminal."""

    def status(self, status, **kwargs):
        if self.is_terminal:
            return super().status(status, **kwargs)
        return LogStatus(self, status)


def _plain(status) -> str:
    return Text.from_markup(status).plain if isinstance(status, str) else Text(str(status)).plain


def line(task: _Task, now: float | None = None) -> str:
    """'harvest: 120/600 (20%), 3.1/s, ETA 2m34s, tokens 15,360' (done: 'in 3m14s')."""
    elapsed = (time.monotonic() if now is None else now) - task.started
    done = task.completed
    name = Text.from_markup(task.description).plain  # descriptions may carry rich markup
    parts = [f"{name}: {_num(done)}"]
    if task.total is not None:
        parts[0] += f"/{_num(task.total)}"
        if task.total > 0:
            parts[0] += f" ({100 * done / task.total:.0f}%)"
    rate = (done - task.start_completed) / elapsed if elapsed > 0 else 0.0
    if rate > 0:
        parts.append(f"{rate:.3g}/s" if rate >= 0.1 else f"{60 * rate:.3g}/min")
    if task.total is not None and done >= task.total:
        parts.append(f"done in {_duration(elapsed)}")
    elif task.total is not None and rate > 0:
        parts.append(f"ETA {_duration((task.total - done) / rate)}")
    else:
        parts.append(f"{_duration(elapsed)} so far")
    parts += [f"{k} {_num(v)}" for k, v in task.fields.items() if v not in (None, "", "-")]
    return ", ".join(parts)


def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.4g}"


def _duration(s: float) -> str:
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


__all__ = [
    "INTERVAL_ENV",
    "LogProgress",
    "LogStatus",
    "StatusConsole",
    "line",
    "make_progress",
    "progress_interval",
]
