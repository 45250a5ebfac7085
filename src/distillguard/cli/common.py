"""What every command module shares: the rich consoles, the ledger option's help,
logging set-up and the --verbose option. Kept apart from ``cli/__init__.py`` so the command
modules that it imports to register do not import it back. (Not named console.py: the package
re-exports a `console` object, which a submodule of that name would shadow.)"""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console

from distillguard.progress import StatusConsole

# Off a terminal (a pipe, a file, CI) rich assumes 80 columns: help boxes cut option names with
# "…", tables crop their cells and messages wrap mid-sentence. There is no screen to fit there,
# so help is drawn HELP_WIDTH wide (every option's row whole) and tables and messages are not
# wrapped at all (a table still takes only the width its cells need). COLUMNS, when set, wins.
HELP_WIDTH = 200
OFF_TERMINAL_WIDTH = 1000


def _console(stderr: bool = False) -> Console:
    # StatusConsole: a spinner ("loading model ...") prints a line at its start and its end off a
    # terminal, where rich's draws nothing (distillguard.progress)
    probe = StatusConsole(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return StatusConsole(stderr=stderr, width=OFF_TERMINAL_WIDTH, soft_wrap=True)


err_console = _console(stderr=True)
console = _console()
if not console.is_terminal and not os.environ.get("COLUMNS"):
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = HELP_WIDTH  # typer draws --help on a console of its own


def make_progress(*columns, transient: bool = False, disable: bool = False):
    """Progress on stderr: rich's bars on a terminal, a plain line every few seconds elsewhere
    (``distillguard.progress``: CI logs, nohup and notebooks saw nothing until the end)."""
    from distillguard.progress import make_progress as make

    return make(*columns, console=err_console, transient=transient, disable=disable)


DB_HELP = "ledger database: a file path, sqlite:///FILE or postgresql+psycopg://USER@HOST/DB (default: user data dir)"


# Hugging Face libraries draw their own tqdm bars (weights loading, dataset maps), read once when
# they are imported, which the commands do lazily after this.
# TQDM_DISABLE: bars of libraries that call tqdm directly (transformers' GGUF conversion, the
# first time a GGUF teacher or its tokenizer is loaded on a machine)
_PROGRESS_BAR_SWITCHES = (
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
)
_switched_off: set[str] = set()


def configure_logging(verbose: bool) -> None:
    """distillguard's own INFO lines; other libraries only at WARNING and without progress bars
    (they log per request, per model load, per plot, and would bury a command's rich output),
    unless ``verbose``: then DEBUG and every library's bars. Variables a user set are left alone;
    they reach the subprocesses a command starts (the demo's gateway) too."""
    # a no-op where the root has a handler (`demo -v` after the root's set-up); the level is not
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("distillguard").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        for name in _switched_off:
            os.environ.pop(name, None)
        _switched_off.clear()
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")  # its own default is warning
    else:
        for name in _PROGRESS_BAR_SWITCHES:
            if name not in os.environ:
                os.environ[name] = "1"
                _switched_off.add(name)


def verbose_option() -> bool:
    return typer.Option(
        False,
        "--verbose",
        "-v",
        help="log debug messages, and show other libraries' log lines and progress bars",
    )
