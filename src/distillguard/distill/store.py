"""The harvest's on-disk store: every paid teacher response, keyed by the request's fingerprint.

SQLite (WAL): a response is committed the moment it arrives, so ``kill -9`` loses none that was
received, and a rerun skips every fingerprint already stored. Malformed answers (empty,
truncated, unparsable) are stored too, since they were paid for, but marked and kept out of
the data.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from distillguard.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    fingerprint TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT,
    status TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


COLUMNS = [
    "fingerprint",
    "prompt_id",
    "request",
    "response",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "created",
]


def fingerprint(request: dict) -> str:
    """Stable id of a request: the same question with the same parameters is paid for once.

    (The stdlib's JSON spelling, not orjson's: stores written by earlier versions must resume.)"""
    return hashlib.sha256(
        json.dumps(request, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def _json_text(value: dict | str | bytes | None) -> str | None:
    """A JSON column's text: dicts serialised (orjson: several times cheaper than ``json`` for the
    large logprobs answers), text already in JSON (the teacher's raw answer) kept as it is."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    return orjson.dumps(value).decode()


def classify_choice(choice: object) -> str:
    """'ok' or 'malformed:<why>' for one of an answer's choices."""
    content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
    if not isinstance(content, str):
        return "malformed:invalid"
    if not content.strip():
        return "malformed:empty"
    if choice.get("finish_reason") == "length":
        return "malformed:truncated"
    return "ok"


def classify(response: object, n: int) -> str:
    """'ok' or 'malformed:<why>' for a parsed teacher answer of ``n`` choices.

    'ok' when at least one choice is usable: with ``n`` > 1 one choice cut at max_tokens must not
    throw away the others, which were paid for too (the export keeps the usable choices only). A
    response whose choices are all unusable is 'malformed:truncated' if any was cut off (a prefix
    some consumers still read, e.g. self-instruct), else 'malformed:empty'.
    """
    if (
        not isinstance(response, dict)
        or not isinstance(response.get("choices"), list)
        or len(response["choices"]) != n
    ):
        return "malformed:invalid"
    statuses = {classify_choice(choice) for choice in response["choices"]}
    for status in ("malformed:invalid", "ok", "malformed:truncated"):
        if status in statuses:
            return status
    return "malformed:empty"


class ResponseStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            self.conn.executescript(SCHEMA)
            columns = [row[1] for row in self.conn.execute("PRAGMA table_info(responses)")]
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            # Never replaced or repaired here: it may hold answers that were paid for.
            raise ConfigError(
                f"{self.path} is not a readable response store ({exc}); move it aside "
                "(or use another --out) to start a new one"
            ) from None
        if columns != COLUMNS:
            self.conn.close()
            raise ConfigError(
                f"{self.path} holds a 'responses' table that is not a distillguard response "
                f"store (columns {columns}); use another --out"
            )

    def close(self) -> None:
        self.conn.close()

    def done(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT fingerprint FROM responses")}

    def put(
        self,
        fp: str,
        prompt_id: str,
        request: dict,
        response: dict | None,
        status: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        self.put_many(
            [(fp, prompt_id, request, response, status, prompt_tokens, completion_tokens, cost_usd)]
        )

    def put_many(self, rows: list[tuple]) -> None:
        """Commit rows ``(fp, prompt_id, request, response, status, prompt_tokens, completion_tokens,
        cost_usd)`` in one transaction (a group commit: one WAL commit for many answers). ``request``
        and ``response`` are dicts or their JSON text (e.g. the raw body the teacher sent)."""
        now = time.time()
        params = [
            (fp, pid, _json_text(req), _json_text(resp), status, p, c, usd, now)
            for fp, pid, req, resp, status, p, c, usd in rows
        ]
        with self.conn:  # BEGIN ... COMMIT (or ROLLBACK)
            if len(params) > 1:
                self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", params
            )

    def totals(self) -> dict:
        n, p, c, usd = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(cost_usd), 0) FROM responses"
        ).fetchone()
        statuses = dict(
            self.conn.execute("SELECT status, COUNT(*) FROM responses GROUP BY status").fetchall()
        )
        return {
            "responses": n,
            "prompt_tokens": p,
            "completion_tokens": c,
            "tokens": p + c,
            "cost_usd": usd,
            "by_status": statuses,
        }

    def records(self, *, only_ok: bool = True) -> Iterator[dict]:
        query = "SELECT fingerprint, prompt_id, request, response, status FROM responses"
        if only_ok:
            query += " WHERE status = 'ok'"
        for fp, pid, req, resp, status in self.conn.execute(
            query + " ORDER BY created, fingerprint"
        ):
            yield {
                "fingerprint": fp,
                "prompt_id": pid,
                "request": orjson.loads(req),
                "response": orjson.loads(resp) if resp else None,
                "status": status,
            }

    def get_many(self, fingerprints: list[str]) -> dict[str, dict]:
        """Stored records (any status) of these fingerprints, by fingerprint; absent ones left out."""
        found = {}
        for i in range(0, len(fingerprints), 500):  # SQLite's bound-parameter limit
            chunk = fingerprints[i : i + 500]
            rows = self.conn.execute(
                "SELECT fingerprint, prompt_id, request, response, status FROM responses "
                f"WHERE fingerprint IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for fp, pid, req, resp, status in rows:
                found[fp] = {
                    "fingerprint": fp,
                    "prompt_id": pid,
                    "request": orjson.loads(req),
                    "response": orjson.loads(resp) if resp else None,
                    "status": status,
                }
        return found

    def export_jsonl(self, path: str | Path, *, keep_capped: bool = False) -> int:
        """Every usable answer in the store to ``path``; the number of rows (see :meth:`export`)."""
        return self.export(path, keep_capped=keep_capped).rows

    def export(
        self,
        path: str | Path,
        *,
        keep_capped: bool = False,
        run: list[str] | None = None,
        scope: str = "store",
    ) -> ExportSummary:
        """The usable data: one line per (prompt, usable choice) with messages, answer, usage, logprobs.

        ``scope`` 'run' writes the answers of the fingerprints ``run`` (one harvest's requests, in
        its prompts' order, whichever run stored them); 'store' writes every stored response, in
        the order they were stored. The summary counts, within the scope, the answers left out
        and why, and the usable rows of the store outside ``run`` (not written with 'run', written
        with 'store').

        Usability is judged per choice: a response of ``n`` choices is 'ok' when any of them is
        usable, and one stored before that rule (all of its choices judged together) still gives
        up its usable choices here. ``keep_capped`` also exports the non-empty choices cut at
        max_tokens (their ``finish_reason`` "length" says so, and ``distill curate`` drops them
        unless told to keep them).
        """
        check_export_scope(scope)
        if scope == "run" and run is None:
            raise ValueError("scope 'run' needs the run's fingerprints")
        summary = ExportSummary(path=str(path), scope=scope, keep_capped=keep_capped)
        members = set(run or ())
        with open(path, "w", encoding="utf-8") as fh:
            if scope == "run":
                found = self.get_many(run)
                summary.unanswered = len(members - set(found))
                for fp in dict.fromkeys(run):
                    if fp in found:
                        summary.rows += _write_rows(fh, found[fp], keep_capped, summary)
            for rec in self.records(only_ok=False):
                if rec["fingerprint"] in members:
                    if scope == "store":
                        summary.rows += _write_rows(fh, rec, keep_capped, summary)
                    continue
                store_scope = scope == "store"
                other = _write_rows(
                    fh if store_scope else None, rec, keep_capped, summary if store_scope else None
                )
                summary.other_rows += other
                summary.rows += other if store_scope else 0
        return summary


EXPORT_SCOPES = ("run", "store")


def check_export_scope(scope: str) -> None:
    if scope not in EXPORT_SCOPES:
        raise ConfigError(
            f"--export {scope!r}: use run (the answers to this run's prompts) or store (every "
            "usable answer in the store)"
        )


@dataclass
class ExportSummary:
    """What an export wrote, what it left out and why (``rows`` is the file's line count)."""

    path: str
    scope: str  # 'run' | 'store'
    keep_capped: bool
    rows: int = 0
    # answers of the run's requests (all stored ones with scope 'store') by what became of them
    capped: int = 0  # reached max_tokens: written with keep_capped, else left out
    malformed: int = 0  # empty, or not a chat completion: left out
    unanswered: int = 0  # the run's requests with nothing stored (failed, over budget)
    other_rows: int = 0  # usable rows of requests outside the run (earlier runs of other prompts)

    def describe(self, max_tokens: int | None = None) -> list[str]:
        """The summary's lines: what the file holds, and the answers left out, named as such."""
        name = Path(self.path).name
        cap = f" {max_tokens}" if max_tokens is not None else ""
        lines = []
        if self.scope == "run":
            lines.append(
                f"{name}: {self.rows} row{'' if self.rows == 1 else 's'}: this run's usable answers"
                + (
                    f" ({self.other_rows} more from earlier runs in the store are not included; "
                    "--export store includes them)"
                    if self.other_rows
                    else ""
                )
            )
        else:
            lines.append(
                f"{name}: {self.rows} row{'' if self.rows == 1 else 's'}: every usable answer in the store"
                + (
                    f", {self.other_rows} of them from earlier runs of other requests "
                    "(--export run keeps to this run's)"
                    if self.other_rows
                    else ""
                )
            )
        if self.capped:
            lines.append(
                f"{self.capped} answers reached --max-tokens{cap} (finish_reason length) and "
                + (
                    f"are in {name} (--keep-capped)"
                    if self.keep_capped
                    else "were dropped; --keep-capped keeps them"
                )
            )
        if self.malformed:
            lines.append(
                f"{self.malformed} answers were malformed (empty, or not a chat completion) and "
                "were dropped"
            )
        return lines


def _write_rows(fh, rec: dict, keep_capped: bool, summary: ExportSummary | None) -> int:
    """Write the usable choices of one stored record to ``fh`` (only count them when ``fh`` is
    None); tally what was left out on ``summary``. Returns the rows."""
    response = rec["response"]
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or classify(response, len(choices)) == "malformed:invalid":
        if summary is not None:
            summary.malformed += len(choices) if isinstance(choices, list) and choices else 1
        return 0
    n = 0
    for choice in choices:
        why = classify_choice(choice)
        if why == "malformed:truncated":
            if summary is not None:
                summary.capped += 1
            if not keep_capped:
                continue
        elif why != "ok":
            if summary is not None:
                summary.malformed += 1
            continue
        n += 1
        if fh is None:
            continue
        fh.write(
            json.dumps(
                {
                    "id": f"{rec['prompt_id']}#{choice.get('index', 0)}",
                    "prompt_id": rec["prompt_id"],
                    "messages": rec["request"]["messages"],
                    "response": choice["message"]["content"],
                    "finish_reason": choice.get("finish_reason"),
                    "usage": response.get("usage"),
                    "logprobs": (choice.get("logprobs") or {}).get("content"),
                },
                ensure_ascii=False,
            )
            + "\n"
        )
    return n
