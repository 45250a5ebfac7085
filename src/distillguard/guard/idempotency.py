"""Idempotency-Keys: a retry gets the first request's stored answer, never a second generation.

A key is claimed by a row in the database (``IdempotentResponse``), not a set in memory, so the
claim holds across replicas. The ledger stores the answer under it, or releases it, in the
request's own row's transaction (:meth:`Claims.settle` says which).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from sqlalchemy import Engine, null, select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from distillguard.errors import APIError
from distillguard.guard.ledger import describe
from distillguard.guard.requestlog import RequestLog
from distillguard.guard.schema import IdempotentResponse

log = logging.getLogger(__name__)


class IdempotencyConflict(APIError):
    status_code = 409
    type = "invalid_request_error"


class IdempotencyInProgress(IdempotencyConflict):
    def __init__(self, retry_after: int = 2):
        super().__init__(
            "a request with this Idempotency-Key is still being answered; retry after Retry-After "
            "seconds to get its answer (no second generation is run)",
            param="Idempotency-Key",
            code="idempotency_in_progress",
        )
        self.headers = {"Retry-After": str(retry_after)}


class Claims:
    """This replica's Idempotency-Key claims; one not renewed for ``claim_ttl_s`` seconds (its
    replica died mid-request) is taken over by a retry. A stored answer is replayed for
    ``response_ttl_s`` seconds, then the key is free again and the row deleted: as Stripe's keys,
    which expire after 24 hours, the table must not grow with every request a client ever sent."""

    def __init__(self, engine: Engine, claim_ttl_s: float, response_ttl_s: float = 86400.0):
        self.engine = engine
        self.claim_ttl_s = claim_ttl_s
        self.response_ttl_s = response_ttl_s
        self._claims: dict[str, tuple[str, str]] = {}  # request id -> (account, key) it holds
        self._next_purge = 0.0

    async def replay(self, log: RequestLog) -> dict | None:
        """Claim this account's Idempotency-Key for this request, or answer from the request that
        claimed it first.

        Returns that request's stored response (a replay), or None: the key is now this
        request's, and the ledger stores its response under it or releases it (:meth:`settle`).
        Raises 409 ``idempotency_key_reused`` when the key came with another request body (a
        client bug that would otherwise return the answer to another question), 409
        ``idempotency_in_progress`` while the first request still runs: a retry must never start
        a second generation.

        The claim is a row in the database, not a set in memory, so it holds across replicas:
        the insert of the pending row (``response`` NULL) is atomic under the table's primary key
        (account, key), whichever replica gets there first. Its holder renews it while it runs
        (:meth:`renew`); one left unrenewed for ``idempotency_claim_ttl_s`` belonged to a
        replica that died mid-request and is taken over, so a crash blocks a key for seconds,
        not forever.
        """
        found = await asyncio.to_thread(self._claim, log)
        if found is None:
            self._claims[log.request_id] = (log.key.account, log.idempotency_key)
        return found

    def _claim(self, log: RequestLog) -> dict | None:
        t = IdempotentResponse.__table__
        here = (t.c.account_id == log.key.account) & (t.c.key == log.idempotency_key)
        dialect_insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[
            self.engine.dialect.name
        ]
        for _ in range(3):  # the row may go between our insert and our read (its claim released)
            now = time.time()
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    dialect_insert(t)
                    .values(
                        account_id=log.key.account,
                        key=log.idempotency_key,
                        request_hash=log.request_hash,
                        request_id=log.request_id,
                        response=null(),
                        created_at=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(t.c.request_id)
                )
                if claimed.first() is not None:  # (rowcount is -1 here on psycopg)
                    return None
                found = conn.execute(
                    select(t.c.request_hash, t.c.request_id, t.c.response, t.c.created_at).where(
                        here
                    )
                ).first()
                if found is None:
                    continue
                expired = (
                    found.response is not None and now - found.created_at > self.response_ttl_s
                )
                if expired:  # the key is free again: this request claims it afresh
                    taken = conn.execute(
                        t.update()
                        .where(here & (t.c.request_id == found.request_id))
                        .values(
                            request_hash=log.request_hash,
                            request_id=log.request_id,
                            response=null(),
                            created_at=now,
                        )
                    )
                    if taken.rowcount == 1:
                        return None
                    continue
                if found.request_hash != log.request_hash:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was already used with a different request body; use a new key",
                        param="Idempotency-Key",
                        code="idempotency_key_reused",
                    )
                if found.response is not None:
                    return _unstored(found.response)
                if now - found.created_at <= self.claim_ttl_s:
                    raise IdempotencyInProgress()
                taken = conn.execute(
                    t.update()
                    .where(here & (t.c.request_id == found.request_id) & t.c.response.is_(None))
                    .values(request_id=log.request_id, created_at=now)
                )
                if taken.rowcount == 1:
                    logging.getLogger(__name__).warning(  # (``log`` is the request's here)
                        "took over the stale Idempotency-Key claim of request %s (not renewed for %.0f s)",
                        found.request_id,
                        now - found.created_at,
                    )
                    return None
        raise IdempotencyInProgress()

    def settle(self, log: RequestLog) -> dict | None:
        """What the ledger does with this request's Idempotency-Key in the row's transaction:
        store a 200's response under it, release a claim this request holds otherwise."""
        if log.idempotency_key is None or log.key is None:
            return None
        held = self._claims.pop(log.request_id, None) is not None
        claim = {
            "account_id": log.key.account,
            "key": log.idempotency_key,
            "request_id": log.request_id,
        }
        if log.status == 200 and log.response_body is not None:
            return {
                **claim,
                "request_hash": log.request_hash,
                "response": _stored(log.response_body),
                "created_at": log.ts,
            }
        return {**claim, "response": None} if held else None

    async def renew(self) -> None:
        """Keep this replica's claims fresh, so no other replica takes over a request still
        running; and, once in a while, delete the stored answers past ``response_ttl_s``."""
        while True:
            await asyncio.sleep(self.claim_ttl_s / 3)
            if time.time() >= self._next_purge:
                self._next_purge = time.time() + min(3600.0, self.response_ttl_s / 4)
                try:
                    await asyncio.to_thread(self.purge)
                except Exception as exc:  # noqa: BLE001 - a database hiccup: next time then
                    log.warning("could not purge expired Idempotency-Keys: %s", describe(exc))
            held = dict(self._claims)
            if not held:
                continue
            try:
                await asyncio.to_thread(self._touch_claims, held)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next round renews them
                log.warning(
                    "could not renew %d Idempotency-Key claim(s): %s", len(held), describe(exc)
                )

    def purge(self, now: float | None = None) -> int:
        """Delete the stored answers older than ``response_ttl_s``; how many went."""
        t = IdempotentResponse.__table__
        cutoff = (time.time() if now is None else now) - self.response_ttl_s
        with self.engine.begin() as conn:
            gone = conn.execute(
                t.delete().where(t.c.response.is_not(None) & (t.c.created_at < cutoff))
            )
        return gone.rowcount

    def _touch_claims(self, held: dict[str, tuple[str, str]]) -> None:
        t = IdempotentResponse.__table__
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(
                    tuple_(t.c.account_id, t.c.key).in_(list(held.values()))
                    & t.c.request_id.in_(list(held))
                    & t.c.response.is_(None)
                )
                .values(created_at=time.time())
            )


# A replayed response must be the one the client was sent, character for character. The ledger
# stores NUL as U+FFFD (PostgreSQL refuses NUL in text and jsonb; see ``without_nul``), so the
# response kept under an Idempotency-Key is stored as its JSON text, in which json.dumps writes
# each NUL as the six ASCII characters ``\\u0000``: nothing for the database to refuse, and lossless.
_SENT = "sent_json"


def _stored(body: dict) -> dict:
    return {_SENT: json.dumps(body, ensure_ascii=False)}


def _unstored(stored: dict) -> dict:
    if set(stored) == {_SENT} and isinstance(stored[_SENT], str):
        return json.loads(stored[_SENT])
    return stored  # a row written before responses were stored as text


__all__ = ["Claims", "IdempotencyConflict", "IdempotencyInProgress"]
