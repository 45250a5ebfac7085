"""The master secret from which every account's watermark key is derived.

From ``DISTILLGUARD_WATERMARK_SECRET`` (or the ``secret`` argument) when set; otherwise from a
file in the user's data directory, created once with 256 random bits and mode 0600. It is
never logged, never stored in the ledger, and never printed (``WatermarkKey.__repr__`` hides
the derived keys too).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from distillguard.errors import ConfigError


def default_secret_path() -> Path:
    root = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(root) / "distillguard" / "watermark.secret"


def write_secret(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` (and a newline) to ``path``, readable and writable by its owner only (0600).

    Every secret file distillguard writes goes through here: the file is created 0600 (never
    briefly world-readable), an existing one is truncated and made 0600 too, and a missing folder
    is created 0700. ``exclusive`` raises :class:`FileExistsError` rather than replace a file (two
    replicas generating the default secret at once keep the first one's).
    """
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)  # os.open's mode applies to new files only
        fh.write(text + "\n")


def load_secret(
    value: str | None = None, path: Path | None = None, *, create: bool = True
) -> bytes:
    if value:
        return value.encode()
    if path is None:
        path = default_secret_path()
        if (
            path.parent.exists()
        ):  # ours alone (it holds the ledger too): private even if made 0755 before
            path.parent.chmod(0o700)
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no watermark secret: set DISTILLGUARD_WATERMARK_SECRET or pass --secret "
                f"(the server keeps its generated one in {path})"
            )
        try:
            write_secret(path, secrets.token_hex(32), exclusive=True)
        except FileExistsError:  # another replica created it first
            pass
    text = path.read_text().strip()
    if not text:
        raise ConfigError(f"watermark secret file {path} is empty; delete it to generate a new one")
    return text.encode()
