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


def load_secret(value: str | None = None, path: Path | None = None, *, create: bool = True) -> bytes:
    if value:
        return value.encode()
    path = path or default_secret_path()
    if not path.exists():
        if not create:
            raise ConfigError(f"no watermark secret: set DISTILLGUARD_WATERMARK_SECRET or pass --secret "
                              f"(the server keeps its generated one in {path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another replica created it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    text = path.read_text().strip()
    if not text:
        raise ConfigError(f"watermark secret file {path} is empty; delete it to generate a new one")
    return text.encode()
