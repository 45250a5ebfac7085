"""The request ledger: a group-committing writer off the event loop, plus export and import.

Durability promise: the gateway awaits :meth:`Ledger.record` (the row's transaction has
committed) *before* it sends the last bytes of a response. So after ``kill -9`` at any
moment, every request whose complete response a client received is in the ledger; a
request cut off mid-way may or may not be.

Writes are batched: one writer thread takes every row waiting in the queue and inserts them
in a single transaction (group commit), so the commit cost is shared by concurrent requests
and the event loop never blocks on the database.

The writer must outlive any row: a row the database (or its driver) refuses fails alone, is
logged and is replaced by a stub row that records the refusal, and no exception ends the
thread. If the writer is dead anyway, or wedged (a queued row waits longer than ``wedged_s``),
:meth:`Ledger.problem` says so: ``/healthz`` fails and the gateway refuses new requests with a
503 instead of letting them hang; :meth:`Ledger.record` waits at most ``wait_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from distillguard.errors import ConfigError, ServiceUnavailable
from distillguard.guard.schema import IdempotentResponse, LedgerRow

log = logging.getLogger(__name__)

COLUMNS = frozenset(c.name for c in LedgerRow.__table__.columns) - {"id"}
_INSERT_ROW = insert(LedgerRow)
_IDEMPOTENT = IdempotentResponse.__table__


class LedgerUnavailable(ServiceUnavailable):
    def __init__(
        self,
        message: str = "the request ledger is unavailable, so the response was withheld; retry later",
    ):
        super().__init__(message, code="ledger_unavailable")


@dataclass
class _Pending:
    row: dict
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    # The Idempotency-Key claim this request holds (account_id, key, request_id): with a
    # "response", stored under it; with response None, released. Same transaction as the row.
    idempotent: dict | None = None
    queued_at: float = field(default_factory=time.monotonic)


class Ledger:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        retries: int = 3,
        wait_s: float = 30.0,
        wedged_s: float = 30.0,
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.retries = retries
        self.wait_s = wait_s
        self.wedged_s = wedged_s
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="distillguard-ledger", daemon=True)
        self._conn: Connection | None = None  # the writer thread's own, kept between batches
        self._writing_since: float | None = None  # queued_at of the oldest row being written
        self.batches = 0  # commits made, for tests and metrics
        self.rows_written = 0
        self.rows_refused = 0  # rows the database would not store (each answered with a 503)
        self.last_commit: float | None = None  # time.monotonic() of the last successful commit
        self.last_error: str | None = None

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
        fut.add_done_callback(_retrieve)  # abandoned requests never await theirs
        self._queue.put(_Pending(without_nul(row), fut, loop, without_nul(idempotent)))
        return fut

    async def record(self, row: dict, *, idempotent: dict | None = None) -> None:
        """Queue ``row`` and wait until it is durably committed, at most ``wait_s``: a client
        gets a 503 rather than a response that hangs (the row may still commit later)."""
        fut = self.submit(row, idempotent=idempotent)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except TimeoutError:
            raise LedgerUnavailable(
                f"the request ledger did not commit within {self.wait_s:g} s, so the response "
                "was withheld; retry later"
            ) from None

    def problem(self) -> str | None:
        """Why the ledger cannot take rows now (its writer is dead or wedged), or None."""
        if not self._thread.is_alive():
            return "the ledger writer is not running"
        since = self._writing_since
        if since is not None and time.monotonic() - since > self.wedged_s:
            return (
                f"the ledger has not committed a row queued {time.monotonic() - since:.0f} s ago "
                f"(last error: {self.last_error or 'none'})"
            )
        return None

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
            self._writing_since = first.queued_at
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here fails this batch, never the writer
                log.exception("ledger writer failed on %d row(s)", len(batch))
                self._answer(batch, exc)
            finally:
                self._writing_since = None
        self._disconnect()

    def _write(self, batch: list[_Pending]) -> None:
        error = self._commit(batch)
        if error is not None and not _transient(error):
            if len(batch) > 1:
                # One bad row (a duplicate id or idempotency key, a value the database or its
                # driver will not take) must not fail its batch-mates: one by one, only it fails.
                for p in batch:
                    self._write([p])
                return
            self._refused(batch[0], error)
        self._answer(batch, error)

    def _refused(self, p: _Pending, error: BaseException) -> None:
        """Keep a trace of a row the database refused: the request happened (and may have been
        charged), so the ledger gets a stub without the content, saying its client got a 503."""
        self.rows_refused += 1
        stub = {
            **p.row,
            "model": None,
            "response_text": None,
            "status": 503,
            "error_code": "ledger_refused",
            "request_body": {"_unstorable": describe(error)},
        }
        release = None if p.idempotent is None else {**p.idempotent, "response": None}
        if self._commit([_Pending(stub, p.future, p.loop, release)]) is not None:
            log.error(
                "ledger could not record even the stub of request %s", p.row.get("request_id")
            )

    def _commit(self, batch: list[_Pending]) -> BaseException | None:
        error: BaseException | None = None
        for attempt in range(self.retries):
            try:
                conn = self._connection()
                with conn.begin():
                    conn.execute(_INSERT_ROW, [p.row for p in batch])
                    for p in batch:
                        if p.idempotent is not None:
                            _settle_claim(conn, p.idempotent)
                self.batches += 1
                self.rows_written += len(batch)
                self.last_commit = time.monotonic()
                return None
            except Exception as exc:  # noqa: BLE001 - any failure is this batch's, the writer goes on
                self._disconnect()  # a fresh connection next time (the database may have restarted)
                error = exc
                self.last_error = describe(exc)
                if not _transient(exc):
                    return exc  # the rows themselves: retrying cannot help
                log.warning(
                    "ledger write failed (attempt %d/%d): %s",
                    attempt + 1,
                    self.retries,
                    self.last_error,
                )
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
            except Exception:  # noqa: BLE001 - a broken connection: the pool discards it
                pass
            self._conn = None

    def _answer(self, batch: list[_Pending], error: BaseException | None) -> None:
        if (
            error is not None
        ):  # the clients get a 503; the operator needs the reason (never the content)
            log.error(
                "ledger refused %d row(s) (%s): %s",
                len(batch),
                ", ".join(str(p.row.get("request_id")) for p in batch[:5]),
                describe(error),
            )
        for p in batch:
            try:
                p.loop.call_soon_threadsafe(
                    _resolve, p.future, None if error is None else LedgerUnavailable()
                )
            except RuntimeError:  # the event loop is closed: nobody is waiting
                pass


def _transient(exc: BaseException) -> bool:
    """A failure of the connection or the server, worth retrying, rather than of the rows."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def describe(exc: BaseException) -> str:
    """What went wrong, for the log: the driver's first line, never the statement's parameters
    (they hold prompts, answers and idempotency keys). ASCII, so a log handler cannot choke on it."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text = (
            f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0] if str(exc.orig) else ''}"
        )
    elif isinstance(exc, SQLAlchemyError):
        text = f"{type(exc).__name__}" + (
            f" ({type(exc.__cause__).__name__})" if exc.__cause__ else ""
        )
    elif isinstance(exc, UnicodeError):
        text = f"{type(exc).__name__}: {getattr(exc, 'reason', '')}"
    else:
        text = f"{type(exc).__name__}: {str(exc)[:200]}"
    return ascii(text)[1:-1]


def _settle_claim(conn: Connection, claim: dict) -> None:
    """Store the response under the Idempotency-Key this request claimed, or release the claim."""
    mine = (
        (_IDEMPOTENT.c.account_id == claim["account_id"])
        & (_IDEMPOTENT.c.key == claim["key"])
        & (_IDEMPOTENT.c.request_id == claim["request_id"])
    )
    if claim.get("response") is None:
        conn.execute(_IDEMPOTENT.delete().where(mine & _IDEMPOTENT.c.response.is_(None)))
        return
    stored = conn.execute(
        _IDEMPOTENT.update()
        .where(mine)
        .values(
            response=claim["response"],
            request_hash=claim["request_hash"],
            created_at=claim["created_at"],
        )
    )
    if stored.rowcount == 0:
        # No claim of ours (written directly, or taken over after it went stale): store the
        # response unless another request holds the key, which then answers its retries.
        dialect = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[conn.dialect.name]
        conn.execute(dialect(_IDEMPOTENT).values(**claim).on_conflict_do_nothing())


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


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
        response["usage"] = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
        }
    if row.response_text is not None:
        response["text"] = row.response_text
    # what the policy ladder did to this request: a reader of the export can tell a canary (the
    # gateway's fabricated answer, not the model's watermarked one) from an answer. getattr: the
    # monitor's feeds select only the columns it reads (guard/detector_service.py)
    action = getattr(row, "policy_action", None)
    if action:
        response["policy_action"] = action
        if is_canary_action(action):
            response["canary"] = True
    record["response"] = response
    if row.label:
        record["label"] = row.label
    return record


def is_canary_action(policy_action: str | None) -> bool:
    """Whether a ledger row's ``policy_action`` ("extracting:log,...,canary") served a canary."""
    if not policy_action or ":" not in policy_action:
        return False
    return "canary" in policy_action.split(":", 1)[1].split(",")


def _policy_action(record: dict) -> str | None:
    """An exported row's policy_action, read back (a string, clipped to its column)."""
    value = (record.get("response") or {}).get("policy_action")
    return value[:64] if isinstance(value, str) and value else None


def export_traffic(
    engine: Engine, out: IO[str], *, since: float | None = None, account: str | None = None
) -> int:
    """Write the ledger as JSONL traffic records, oldest first; returns the count."""
    n = 0
    for record in iter_traffic(engine, since=since, account=account):
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n


def iter_traffic(
    engine: Engine, *, since: float | None = None, account: str | None = None
) -> Iterator[dict]:
    """The ledger as traffic records, oldest first, streamed from the database (any size)."""
    query = (
        select(*LedgerRow.__table__.columns)
        .where(LedgerRow.account_id.is_not(None))
        .order_by(LedgerRow.ts, LedgerRow.id)
    )
    if since is not None:
        query = query.where(LedgerRow.ts >= since)
    if account is not None:
        query = query.where(LedgerRow.account_id == account)
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=1000).execute(query):
            yield to_traffic(row)


def read_traffic(lines: Iterable[str], *, source: str = "<traffic>") -> Iterator[tuple[int, dict]]:
    """Parse traffic-log lines (an open file, binary or text: split at "\n" only, never with
    ``str.splitlines()``), checking the required fields; errors name the line."""
    from distillguard.jsonl import iter_lines

    for lineno, record in iter_lines(lines, source):
        for key, kind in (("ts", (int, float)), ("account", str), ("request", dict)):
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                raise ConfigError(f"{source}:{lineno}: field {key!r} is missing or not a {kind}")
        yield lineno, record


def import_traffic(
    engine: Engine, lines: Iterable[str], *, source: str = "<traffic>", batch: int = 1000
) -> int:
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
                conn.execute(
                    stmt(table).on_conflict_do_nothing(index_elements=["request_id"]), rows
                )
            rows.clear()

    for _, rec in read_traffic(lines, source=source):
        usage = (rec.get("response") or {}).get("usage") or {}
        digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:40]
        rows.append(
            {
                "request_id": f"import-{digest}",
                "ts": float(rec["ts"]),
                "account_id": rec["account"],
                "client_ip": rec.get("ip"),
                "model": rec["request"].get("model"),
                "request_body": rec["request"],
                "response_text": (rec.get("response") or {}).get("text"),
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "status": int((rec.get("response") or {}).get("status", 200)),
                "stream": bool(rec["request"].get("stream")),
                "label": rec.get("label"),
                "policy_action": _policy_action(rec),
            }
        )
        n += 1
        if len(rows) >= batch:
            flush()
    flush()
    return n


def account_usage(engine: Engine, account: str | None = None) -> list[dict]:
    """Requests, tokens and last-seen time per account, from the ledger."""
    query = (
        select(
            LedgerRow.account_id,
            func.count(),
            func.coalesce(func.sum(LedgerRow.prompt_tokens), 0),
            func.coalesce(func.sum(LedgerRow.completion_tokens), 0),
            func.max(LedgerRow.ts),
        )
        .where(LedgerRow.account_id.is_not(None))
        .group_by(LedgerRow.account_id)
        .order_by(LedgerRow.account_id)
    )
    if account is not None:
        query = query.where(LedgerRow.account_id == account)
    with engine.connect() as conn:
        return [
            {
                "account": a,
                "requests": int(c),
                "prompt_tokens": int(p),
                "completion_tokens": int(k),
                "total_tokens": int(p) + int(k),
                "last_seen": last,
            }
            for a, c, p, k, last in conn.execute(query)
        ]
