"""The request ledger: a group-committing writer off the event loop, plus export and import.

Durability promise: the gateway awaits :meth:`Ledger.record` (the row's transaction has
committed) *before* it sends the last bytes of a response. So after ``kill -9`` at any
moment, every request whose complete response a client received is in the ledger; a
request cut off mid-way may or may not be.

Writes are batched: one writer thread takes every row waiting in the queue and inserts them
in a single transaction (group commit), so the commit cost is shared by concurrent requests
and the event loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from distillguard.errors import APIError, ConfigError
from distillguard.guard.schema import IdempotentResponse, LedgerRow

log = logging.getLogger(__name__)

COLUMNS = frozenset(c.name for c in LedgerRow.__table__.columns) - {"id"}
_INSERT_ROW = insert(LedgerRow)
_INSERT_IDEMPOTENT = insert(IdempotentResponse)


class LedgerUnavailable(APIError):
    status_code = 503
    type = "server_error"


@dataclass
class _Pending:
    row: dict
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    idempotent: dict | None = None  # an IdempotentResponse row, committed with the ledger row


class Ledger:
    def __init__(self, engine: Engine, *, max_batch: int = 512, retries: int = 3):
        self.engine = engine
        self.max_batch = max_batch
        self.retries = retries
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="distillguard-ledger", daemon=True)
        self._conn: Connection | None = None  # the writer thread's own, kept between batches
        self.batches = 0  # commits made, for tests and metrics
        self.rows_written = 0

    def start(self) -> None:
        self._thread.start()

    async def close(self) -> None:
        """Write everything queued, then stop the writer."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 60)

    def submit(self, row: dict, *, idempotent: dict | None = None) -> asyncio.Future:
        """Queue ``row`` (and the response stored under an idempotency key, in the same
        transaction); the returned future resolves once committed. Call from the event loop."""
        unknown = set(row) - COLUMNS
        if unknown:
            raise ValueError(f"unknown ledger columns: {sorted(unknown)}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Pending(without_nul(row), fut, loop, without_nul(idempotent)))
        return fut

    async def record(self, row: dict, *, idempotent: dict | None = None) -> None:
        """Queue ``row`` and wait until it is durably committed."""
        await self.submit(row, idempotent=idempotent)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
        self._disconnect()

    def _write(self, batch: list[_Pending]) -> None:
        error = self._commit(batch)
        if isinstance(error, (IntegrityError, DataError)) and len(batch) > 1:
            # One bad row (a duplicate id or idempotency key, a value the database will not
            # store) must not fail its batch-mates: write them one by one so only it fails.
            for p in batch:
                self._answer([p], self._commit([p]))
            return
        self._answer(batch, error)

    def _commit(self, batch: list[_Pending]) -> BaseException | None:
        error: BaseException | None = None
        for attempt in range(self.retries):
            try:
                conn = self._connection()
                with conn.begin():
                    conn.execute(_INSERT_ROW, [p.row for p in batch])
                    idempotent = [p.idempotent for p in batch if p.idempotent is not None]
                    if idempotent:
                        conn.execute(_INSERT_IDEMPOTENT, idempotent)
                self.batches += 1
                self.rows_written += len(batch)
                return None
            except (IntegrityError, DataError) as exc:
                self._disconnect()
                return exc  # retrying cannot help
            except SQLAlchemyError as exc:
                self._disconnect()  # retry on a fresh connection (the database may have restarted)
                error = exc
                log.warning("ledger write failed (attempt %d/%d): %s", attempt + 1, self.retries, exc)
                time.sleep(0.05 * 2**attempt)
        return error

    def _connection(self) -> Connection:
        # One connection for the writer's lifetime: a pool checkout, reset and checkin per batch
        # cost about as much as the insert and commit themselves.
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                pass  # a broken connection: the pool discards it
            self._conn = None

    def _answer(self, batch: list[_Pending], error: BaseException | None) -> None:
        if error is not None:  # the clients get a 503; the operator needs the database's reason
            log.error("ledger refused %d row(s): %s", len(batch), error)
        for p in batch:
            if error is None:
                p.loop.call_soon_threadsafe(_resolve, p.future, None)
            else:
                p.loop.call_soon_threadsafe(_resolve, p.future, LedgerUnavailable(
                    "the request ledger is unavailable, so the response was withheld; retry later",
                    code="ledger_unavailable"))


def without_nul(value):
    """``value`` with every NUL character in its strings (dict keys included) replaced by U+FFFD.

    PostgreSQL stores no NUL in ``text`` or ``jsonb`` (SQLite does), yet a model can generate
    one (a byte-level token) and a client can send ``"\\u0000"``: without this, such a row is
    refused and, in a group commit, fails its batch-mates too. The replacement is the one
    Unicode prescribes for a character that cannot be represented; nothing else changes, on
    every backend alike, so the ledger reads the same whichever database holds it."""
    if not _has_nul(value):
        return value  # the common case: no copy of the row
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    return [without_nul(v) for v in value]


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


# ---- traffic-log export and import (DESIGN.md "Traffic log") ----------------------------

def to_traffic(row) -> dict:
    """One ledger row as a traffic-log record."""
    record = {"ts": row.ts, "account": row.account_id, "request": row.request_body or {}}
    if row.client_ip:
        record["ip"] = row.client_ip
    response: dict = {"status": row.status}
    if row.prompt_tokens is not None or row.completion_tokens is not None:
        response["usage"] = {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}
    if row.response_text is not None:
        response["text"] = row.response_text
    record["response"] = response
    if row.label:
        record["label"] = row.label
    return record


def export_traffic(engine: Engine, out: IO[str], *, since: float | None = None,
                   account: str | None = None) -> int:
    """Write the ledger as JSONL traffic records, oldest first; returns the count."""
    query = (select(*LedgerRow.__table__.columns).where(LedgerRow.account_id.is_not(None))
             .order_by(LedgerRow.ts, LedgerRow.id))
    if since is not None:
        query = query.where(LedgerRow.ts >= since)
    if account is not None:
        query = query.where(LedgerRow.account_id == account)
    n = 0
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=1000).execute(query):
            out.write(json.dumps(to_traffic(row), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_traffic(lines: Iterable[str], *, source: str = "<traffic>") -> Iterator[tuple[int, dict]]:
    """Parse traffic-log lines, checking the required fields; errors name the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{source}:{lineno}: expected a JSON object")
        for key, kind in (("ts", (int, float)), ("account", str), ("request", dict)):
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                raise ConfigError(f"{source}:{lineno}: field {key!r} is missing or not a {kind}")
        yield lineno, record


def import_traffic(engine: Engine, lines: Iterable[str], *, source: str = "<traffic>",
                   batch: int = 1000) -> int:
    """Load traffic-log records into the ledger. Idempotent: re-importing a file adds nothing."""
    import hashlib

    dialect = engine.dialect.name
    table = LedgerRow.__table__
    stmt = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if stmt is None:
        raise ConfigError(f"ledger import supports SQLite and PostgreSQL, not {dialect}")
    n = 0
    rows: list[dict] = []

    def flush() -> None:
        if rows:
            with engine.begin() as conn:
                conn.execute(stmt(table).on_conflict_do_nothing(index_elements=["request_id"]), rows)
            rows.clear()

    for _, rec in read_traffic(lines, source=source):
        usage = (rec.get("response") or {}).get("usage") or {}
        digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:40]
        rows.append({
            "request_id": f"import-{digest}", "ts": float(rec["ts"]), "account_id": rec["account"],
            "client_ip": rec.get("ip"), "model": rec["request"].get("model"), "request_body": rec["request"],
            "response_text": (rec.get("response") or {}).get("text"),
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "status": int((rec.get("response") or {}).get("status", 200)), "stream": bool(rec["request"].get("stream")),
            "label": rec.get("label"),
        })
        n += 1
        if len(rows) >= batch:
            flush()
    flush()
    return n


def account_usage(engine: Engine, account: str | None = None) -> list[dict]:
    """Requests, tokens and last-seen time per account, from the ledger."""
    query = (select(LedgerRow.account_id, func.count(), func.coalesce(func.sum(LedgerRow.prompt_tokens), 0),
                    func.coalesce(func.sum(LedgerRow.completion_tokens), 0), func.max(LedgerRow.ts))
             .where(LedgerRow.account_id.is_not(None)).group_by(LedgerRow.account_id).order_by(LedgerRow.account_id))
    if account is not None:
        query = query.where(LedgerRow.account_id == account)
    with engine.connect() as conn:
        return [{"account": a, "requests": int(c), "prompt_tokens": int(p), "completion_tokens": int(k),
                 "total_tokens": int(p) + int(k), "last_seen": last} for a, c, p, k, last in conn.execute(query)]
