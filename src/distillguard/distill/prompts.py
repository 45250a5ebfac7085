"""Prompt sources for harvesting: JSONL / CSV / Parquet files, an HF ``datasets`` directory, or the
bundled ShareGPT first turns (``sharegpt``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from distillguard.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def _from_record(rec: dict, index: int, where: str) -> Prompt:
    pid = str(rec.get("id", index))
    request = rec.get("request")
    if "messages" not in rec and isinstance(request, dict) and "messages" in request:
        rec = request  # a traffic record (`ledger export`): the prompt is its request's messages
    if isinstance(rec.get("messages"), list):
        msgs = tuple(_message(m, where) for m in rec["messages"])
        if not msgs:
            raise ConfigError(f"{where}: 'messages' is empty")
        return Prompt(pid, msgs)
    for field in ("prompt", "instruction", "question", "text"):
        if isinstance(rec.get(field), str) and rec[field].strip():
            return Prompt(pid, (("user", rec[field]),))
    raise ConfigError(
        f"{where}: no 'messages' list or 'prompt'/'instruction'/'question'/'text' string"
    )


def _message(m: object, where: str) -> tuple[str, str]:
    """(role, text) of one chat message; OpenAI's content parts (``[{"type": "text", "text": ...}]``)
    are joined. Anything else is refused: ``str()`` of it would send the teacher 'None' or '[{...'."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
        raise ConfigError(f"{where}: each message needs a 'role' string and 'content'")
    content = m["content"]
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ConfigError(
            f"{where}: a message's 'content' must be a string or a list of text parts "
            f"(got {type(content).__name__}{'' if not isinstance(content, list) else ' with non-text parts'})"
        )
    return m["role"], content


def load_prompts(
    source: str, *, limit: int | None = None, skip: int = 0, max_chars: int | None = None
) -> list[Prompt]:
    """Prompts from ``source``: ``sharegpt``, a .jsonl/.csv/.parquet file, or a ``datasets`` directory.

    ``skip`` and ``limit`` select a deterministic slice (e.g. to keep a held-out split apart);
    ``max_chars`` drops prompts longer than that.
    """
    for name, value in (
        ("--skip", skip),
        ("--limit", limit),
    ):  # a negative skip would slice from the end
        if value is not None and value < 0:
            raise ConfigError(f"{name} {value} cannot be negative")
    # Stop reading early only when no length filter can drop prompts from the slice.
    prompts = _load(source, skip + limit if limit is not None and max_chars is None else None)
    if max_chars is not None:
        prompts = [p for p in prompts if sum(len(c) for _, c in p.messages) <= max_chars]
    prompts = prompts[skip:]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        slice_ = ", ".join(
            f"{k} {v}"
            for k, v in (("skip", skip or None), ("limit", limit), ("max_chars", max_chars))
            if v is not None
        )
        raise ConfigError(f"no prompts in {source}" + (f" ({slice_})" if slice_ else ""))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"prompt ids in {source} are not unique")
    return prompts


def _load(source: str, want: int | None) -> list[Prompt]:
    if source == "sharegpt":
        from distillguard.data import iter_conversations

        out = []
        for conv in iter_conversations():
            if conv.first_prompt:
                out.append(Prompt(f"sharegpt-{conv.id}", (("user", conv.first_prompt),)))
                if want is not None and len(out) >= want:
                    break
        return out
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(
            f"no such prompt source: {source} (use a .jsonl/.csv/.parquet file, a datasets "
            "directory, or `sharegpt`)"
        )
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise ConfigError(
                f"{source} is a directory: reading HF datasets needs `pip install datasets`"
            ) from None
        return [
            _from_record(dict(r), i, f"{source}[{i}]")
            for i, r in enumerate(load_from_disk(str(path)))
        ]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        from distillguard.jsonl import iter_jsonl

        out = []
        for n, rec in iter_jsonl(path, name=source):
            out.append(_from_record(rec, len(out), f"{source}:{n}"))
        return out
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return [
                _from_record(row, i, f"{source}:{i + 2}")
                for i, row in enumerate(csv.DictReader(fh))
            ]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading Parquet needs `pip install pyarrow`") from None
        return [
            _from_record(r, i, f"{source}[{i}]")
            for i, r in enumerate(pq.read_table(path).to_pylist())
        ]
    raise ConfigError(f"unknown prompt file type {suffix!r}: use .jsonl, .csv or .parquet")
