"""Accounts and API keys, stored hashed.

A key is ``dg-`` + 43 url-safe random characters (256 bits). Only its SHA-256 is stored; a
fast hash is right here because the key is random, not a password (no dictionary to
stretch against). Lookups go by hash and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from distillguard.errors import ConfigError
from distillguard.guard.limits import Limits
from distillguard.guard.schema import Account, ApiKey

KEY_PREFIX = "dg-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    account: str
    prefix: str
    name: str | None
    created_at: float
    revoked_at: float | None
    limits: Limits
    key_hash: str = ""

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        """What the admin API and ``keys list`` show: never the hash, never the key."""
        return {
            "id": self.id, "account": self.account, "prefix": self.prefix, "name": self.name,
            "created_at": self.created_at, "revoked_at": self.revoked_at, "active": self.active,
            "rpm": self.limits.rpm, "tpm": self.limits.tpm, "max_concurrent": self.limits.max_concurrent,
            "daily_tokens": self.limits.daily_tokens,
        }


def _record(row) -> KeyRecord:
    """From an ``ApiKey`` object or a result row of the ``api_keys`` columns."""
    return KeyRecord(
        id=row.id, account=row.account_id, prefix=row.prefix, name=row.name, created_at=row.created_at,
        revoked_at=row.revoked_at, key_hash=row.key_hash,
        limits=Limits(rpm=row.rpm, tpm=row.tpm, max_concurrent=row.max_concurrent, daily_tokens=row.daily_tokens),
    )


_COLUMNS = select(*ApiKey.__table__.columns)


class KeyStore:
    """Synchronous key management on the gateway's database (call through a thread from async code)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, account: str, *, limits: Limits = Limits(), name: str | None = None) -> tuple[KeyRecord, str]:
        """Create a key for ``account`` (created if new). Returns the record and the secret key,
        which exists nowhere else afterwards."""
        account = account.strip()
        if not account or len(account) > 128:
            raise ConfigError(f"invalid account name {account!r}: use 1-128 characters")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        row = ApiKey(
            id="key_" + secrets.token_hex(6), account_id=account, key_hash=hash_key(secret),
            prefix=secret[:8], name=name, created_at=now, rpm=limits.rpm, tpm=limits.tpm,
            max_concurrent=limits.max_concurrent, daily_tokens=limits.daily_tokens,
        )
        with self.engine.begin() as conn:
            exists = conn.execute(select(Account.id).where(Account.id == account)).first()
            if not exists:
                conn.execute(Account.__table__.insert().values(id=account, created_at=now, disabled=False))
            conn.execute(ApiKey.__table__.insert().values(
                {c.name: getattr(row, c.key) for c in ApiKey.__table__.columns if getattr(row, c.key) is not None}))
        return _record(row), secret

    def list(self, account: str | None = None, *, include_revoked: bool = True) -> list[KeyRecord]:
        query = _COLUMNS.order_by(ApiKey.created_at)
        if account is not None:
            query = query.where(ApiKey.account_id == account)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def get(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_COLUMNS.where(ApiKey.id == key_id)).first()
        return _record(row) if row else None

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first revocation time)."""
        with self.engine.begin() as conn:
            conn.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                         .values(revoked_at=time.time()))
        record = self.get(key_id)
        if record is None:
            raise ConfigError(f"no key with id {key_id!r}; `distillguard keys list` shows the ids")
        return record

    def lookup(self, secret: str) -> KeyRecord | None:
        """The active key whose secret is ``secret``, or None."""
        digest = hash_key(secret)
        with self.engine.connect() as conn:
            row = conn.execute(_COLUMNS.where(ApiKey.key_hash == digest)).first()
        if row is None:
            return None
        record = _record(row)
        if not hmac.compare_digest(record.key_hash, digest) or not record.active:
            return None
        return record
