"""The one way distillguard reads JSONL (traffic logs, ledger exports, harvested data, prompts).

A record ends at ``"\\n"`` and nowhere else. ``str.splitlines()`` also splits at U+2028, U+2029,
U+0085, ``\\x1c``-``\\x1e``, ``\\v`` and ``\\f``, which JSON allows raw inside a string (writers with
``ensure_ascii=False`` leave them so, and ShareGPT prompts hold them): a file read that way
breaks a good record in two and reports it as invalid. Here the file is read as bytes, whose
line iteration splits at ``b"\\n"`` only, and each line is decoded on its own, so a bad byte or a
bad record is an error naming ``path:line`` and what is wrong, never a traceback.

Blank lines are skipped; a line that is not a JSON object is an error (every JSONL file the
project reads holds objects).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from distillguard.errors import DataFileError

_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def parse_line(line: str | bytes, name: str, lineno: int) -> dict | None:
    """The JSON object on one line (``None`` for a blank line); errors name ``name:lineno``."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFileError(
                name,
                lineno,
                f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1})",
            ) from None
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not line.strip():
        return None
    try:
        obj = json.loads(line.rstrip("\r\n"))  # a column past the end would point nowhere
    except json.JSONDecodeError as exc:
        raise DataFileError(
            name, lineno, f"not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # over-long integers, nesting past the stack
        raise DataFileError(name, lineno, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        what = "null" if obj is None else _KINDS.get(type(obj), type(obj).__name__)
        raise DataFileError(name, lineno, f"expected a JSON object, got {what}")
    return obj


def iter_lines(lines: Iterable[str | bytes], name: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``lines`` (already split at "\\n":
    an open file or stream, never ``text.splitlines()``)."""
    for lineno, line in enumerate(lines, 1):
        obj = parse_line(line, name, lineno)
        if obj is not None:
            yield lineno, obj


def iter_jsonl(source: str | Path | IO, *, name: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each record of ``source``: a path, ``-`` for standard input,
    or an open stream (binary, or text). Streams: the file is never held whole in memory."""
    if isinstance(source, (str, Path)):
        if str(source) == "-":
            stream = getattr(sys.stdin, "buffer", sys.stdin)
            yield from iter_lines(stream, name or "<stdin>")
            return
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataFileError(str(source), None, "no such file")
        with open(path, "rb") as fh:
            yield from iter_lines(fh, name or str(source))
        return
    yield from iter_lines(source, name or getattr(source, "name", None) or "<stream>")


def read_jsonl(source: str | Path | IO, *, name: str | None = None) -> list[dict]:
    """Every record of ``source`` (see :func:`iter_jsonl`)."""
    return [obj for _, obj in iter_jsonl(source, name=name)]


def read_text_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a plain-text file, split at "\\n" only (a U+2028 inside a prompt
    stays in it), stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(str(path), None, "no such file")
    out = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    str(path), lineno, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                out.append(line.strip())
    return out


__all__ = ["iter_jsonl", "iter_lines", "parse_line", "read_jsonl", "read_text_lines"]
