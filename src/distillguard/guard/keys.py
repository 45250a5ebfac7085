"""Accounts and API keys, stored hashed.

A key is ``dg-`` + 43 url-safe random characters (256 bits). Only its SHA-256 is stored; a
fast hash is right here because the key is random, not a password (no dictionary to
stretch against). Lookups go by hash and the final comparison is constant-time.

A key may expire (``expires_at``; rotation gives the old key a grace period and a new key the
same account, limits and models) and may be restricted to a list of model ids. An account has
limits of its own, over all its keys together (``set_account_limits``).

Account names match ``ACCOUNT_PATTERN`` wherever they enter (admin API, CLI, this store): they
appear in Redis keys (where ``/`` separates an account from its key), URLs, file names of
exports and log lines, so NUL, ``/``, whitespace, control characters and lone surrogates are
refused rather than escaped at each of those places.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine, select, update

from distillguard.errors import ConfigError
from distillguard.guard.limits import Limits
from distillguard.guard.schema import Account, ApiKey

KEY_PREFIX = "dg-"
ACCOUNT_PATTERN = r"[A-Za-z0-9._@:+-]{1,128}"
_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
MAX_NAME = 128  # the api_keys.name column
MAX_MODELS, MAX_MODEL_ID = 100, 256
MAX_SECONDS = 100 * 365 * 86_400  # an expiry or grace period further out than this is a typo


def check_account(name: object) -> str:
    """``name`` if it is a valid account name, else a ConfigError naming it and the pattern."""
    if not isinstance(name, str) or _ACCOUNT_RE.fullmatch(name) is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(
            f"invalid account name {shown}: use 1-128 characters from {ACCOUNT_PATTERN[:-7]} "
            "(ASCII letters, digits and . _ @ : + -)"
        )
    return name


def check_models(models: object) -> tuple[str, ...] | None:
    """A model allowlist as a tuple of distinct ids in the given order, or None (every model)."""
    if models is None:
        return None
    if (
        isinstance(models, str)
        or not isinstance(models, (list, tuple))
        or not 1 <= len(models) <= MAX_MODELS
    ):
        raise ConfigError(
            f"models={models!r} is invalid: give 1-{MAX_MODELS} model ids, or none for every model"
        )
    for m in models:
        if not isinstance(m, str) or not 1 <= len(m) <= MAX_MODEL_ID or not m.isprintable():
            raise ConfigError(
                f"model id {m!r} is invalid: use 1-{MAX_MODEL_ID} printable characters"
            )
    return tuple(dict.fromkeys(models))


def check_seconds(name: str, seconds: object, *, minimum: float) -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or not minimum <= seconds <= MAX_SECONDS
    ):
        raise ConfigError(
            f"{name}={seconds!r} is invalid: use {minimum:g} to {MAX_SECONDS} seconds"
        )
    return float(seconds)


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
    expires_at: float | None = None
    models: tuple[str, ...] | None = None  # None: every model
    rotated_from: str | None = None
    account_limits: Limits = field(default_factory=Limits)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (
            time.time() if now is None else now
        )

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict:
        """What the admin API and ``keys list`` show: never the hash, never the key."""
        return {
            "id": self.id,
            "account": self.account,
            "prefix": self.prefix,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "active": self.active,
            "expires_at": self.expires_at,
            "expired": self.expired(),
            "models": list(self.models) if self.models is not None else None,
            "rotated_from": self.rotated_from,
            **self.limits.public(),
        }


def _limits(row) -> Limits:
    return Limits(
        rpm=row.rpm,
        tpm=row.tpm,
        max_concurrent=row.max_concurrent,
        daily_tokens=row.daily_tokens,
        daily_usd=row.daily_usd,
    )


def _record(row, account_limits: Limits = Limits()) -> KeyRecord:
    """From an ``ApiKey`` object or a result row of the ``api_keys`` columns."""
    return KeyRecord(
        id=row.id,
        account=row.account_id,
        prefix=row.prefix,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        key_hash=row.key_hash,
        limits=_limits(row),
        expires_at=row.expires_at,
        models=tuple(row.models) if row.models is not None else None,
        rotated_from=row.rotated_from,
        account_limits=account_limits,
    )


_COLUMNS = select(*ApiKey.__table__.columns)
_ACCOUNT_LIMITS = select(
    Account.rpm, Account.tpm, Account.max_concurrent, Account.daily_tokens, Account.daily_usd
)


class KeyStore:
    """Synchronous key management on the gateway's database (call through a thread from async code)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def create(
        self,
        account: str,
        *,
        limits: Limits = Limits(),
        name: str | None = None,
        expires_at: float | None = None,
        models=None,
        _rotated_from: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Create a key for ``account`` (created if new). Returns the record and the secret key,
        which exists nowhere else afterwards."""
        check_account(account)
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
            raise ConfigError(f"key name {name!r} is invalid: use at most {MAX_NAME} characters")
        if expires_at is not None:
            check_seconds("expires_at", expires_at, minimum=0)
        models = check_models(models)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        row = ApiKey(
            id="key_" + secrets.token_hex(6),
            account_id=account,
            key_hash=hash_key(secret),
            prefix=secret[:8],
            name=name,
            created_at=now,
            rpm=limits.rpm,
            tpm=limits.tpm,
            max_concurrent=limits.max_concurrent,
            daily_tokens=limits.daily_tokens,
            daily_usd=limits.daily_usd,
            expires_at=expires_at,
            models=list(models) if models is not None else None,
            rotated_from=_rotated_from,
        )
        with self.engine.begin() as conn:
            account_limits = self._ensure_account(conn, account, now)
            conn.execute(
                ApiKey.__table__.insert().values(
                    {
                        c.name: getattr(row, c.key)
                        for c in ApiKey.__table__.columns
                        if getattr(row, c.key) is not None
                    }
                )
            )
        return _record(row, account_limits), secret

    @staticmethod
    def _ensure_account(conn, account: str, now: float) -> Limits:
        """The account's limits, creating it (unlimited) if new."""
        found = conn.execute(_ACCOUNT_LIMITS.where(Account.id == account)).first()
        if found is None:
            conn.execute(
                Account.__table__.insert().values(id=account, created_at=now, disabled=False)
            )
            return Limits()
        return _limits(found)

    def rotate(
        self, key_id: str, *, grace_s: float, expires_at: float | None = None
    ) -> tuple[KeyRecord, str, KeyRecord]:
        """A new key for the same account, limits, name and models; the old key expires after
        ``grace_s`` seconds (or keeps an earlier expiry). Returns (new record, its secret, old
        record). The new key expires at ``expires_at`` (default: never)."""
        grace_s = check_seconds("grace", grace_s, minimum=0)
        old = self.get(key_id)
        if old is None:
            raise ConfigError(f"no key with id {key_id!r}; `distillguard keys list` shows the ids")
        if not old.active:
            raise ConfigError(
                f"key {key_id!r} is revoked: create a new key with `distillguard keys create` "
                "instead of rotating it"
            )
        new, secret = self.create(
            old.account,
            limits=old.limits,
            name=old.name,
            models=old.models,
            expires_at=expires_at,
            _rotated_from=old.id,
        )
        until = time.time() + grace_s
        with self.engine.begin() as conn:
            conn.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == key_id, (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > until)
                )
                .values(expires_at=until)
            )
        return new, secret, self.get(key_id)

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
            return _record(row, self._account_limits(conn, row.account_id)) if row else None

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first revocation time)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        record = self.get(key_id)
        if record is None:
            raise ConfigError(f"no key with id {key_id!r}; `distillguard keys list` shows the ids")
        return record

    def lookup(self, secret: str) -> KeyRecord | None:
        """The unrevoked key whose secret is ``secret`` (expired or not: the caller tells the
        client which), with its account's limits; or None."""
        digest = hash_key(secret)
        with self.engine.connect() as conn:
            row = conn.execute(_COLUMNS.where(ApiKey.key_hash == digest)).first()
            if row is None:
                return None
            record = _record(row, self._account_limits(conn, row.account_id))
        if not hmac.compare_digest(record.key_hash, digest) or not record.active:
            return None
        return record

    # ---- accounts -----------------------------------------------------------------------
    @staticmethod
    def _account_limits(conn, account: str) -> Limits:
        found = conn.execute(_ACCOUNT_LIMITS.where(Account.id == account)).first()
        return _limits(found) if found is not None else Limits()

    def account_limits(self, account: str) -> Limits:
        """The limits over all of ``account``'s keys together (unlimited if it has none)."""
        with self.engine.connect() as conn:
            return self._account_limits(conn, account)

    def set_account_limits(self, account: str, limits: Limits) -> Limits:
        """Replace the account's limits (``None`` fields: unlimited); the account is created if new.
        Other replicas apply them within their key cache's TTL."""
        check_account(account)
        with self.engine.begin() as conn:
            self._ensure_account(conn, account, time.time())
            conn.execute(update(Account).where(Account.id == account).values(**limits.public()))
        return limits
