"""The gateway's database schema (SQLAlchemy 2 ORM), shared by SQLite and PostgreSQL.

Changed only through Alembic migrations (``migrations/versions``); ``tests/guard/test_schema.py``
checks that the migrated database matches these models exactly.

Indexes follow the queries that run against them: the ledger is read per account over time
(detectors, usage, export ``--since``), per key, and globally by time.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[float] = mapped_column(Double, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Limits over all the account's keys together (NULL: unlimited); see guard/limits.py.
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger)
    daily_usd: Mapped[float | None] = mapped_column(Double)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), nullable=False, index=True)
    # sha256 of the secret key; the key itself is shown once at creation and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Double, nullable=False)
    revoked_at: Mapped[float | None] = mapped_column(Double)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger)
    daily_usd: Mapped[float | None] = mapped_column(Double)
    # After this time the key answers 401 expired_api_key (a rotated key's grace period ends).
    expires_at: Mapped[float | None] = mapped_column(Double)
    # The model ids this key may use (NULL: all); a JSON list of strings.
    models: Mapped[list | None] = mapped_column(JSONType)
    # The key this one replaced (``keys rotate``), for the audit trail.
    rotated_from: Mapped[str | None] = mapped_column(String(32))


class LedgerRow(Base):
    """One request through the gateway: who, what they asked, what they got, and what we did."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_account_ts", "account_id", "ts"),
        Index("ix_requests_key_ts", "key_id", "ts"),
        Index("ix_requests_ts", "ts"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    ts: Mapped[float] = mapped_column(Double, nullable=False)
    account_id: Mapped[str | None] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(32))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256))
    request_body: Mapped[dict | None] = mapped_column(JSONType)
    response_text: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Double)
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    policy_action: Mapped[str | None] = mapped_column(String(64))
    watermark_key_id: Mapped[str | None] = mapped_column(String(64))
    # Ground truth carried by imported traffic logs (evaluation only; detectors never read it).
    label: Mapped[str | None] = mapped_column(String(64))


class IdempotentResponse(Base):
    """The response to a request sent with an ``Idempotency-Key``, so a retry is answered once.

    The row is first a claim (``response`` NULL), inserted before generating: a concurrent retry
    finds it and waits, on any replica. Its holder renews ``created_at`` while it runs, then
    stores the response in the same transaction as the request's ledger row (see ``Ledger``),
    or deletes the claim if the request failed. A client that resends the key after a crash gets
    this response back instead of a second generation.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("account_id", "key", name="pk_idempotency_keys"),)

    account_id: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    response: Mapped[dict | None] = mapped_column(
        JSONType, nullable=True
    )  # NULL: claimed, still running
    # when the response was stored; while a claim, when its holder last renewed it
    created_at: Mapped[float] = mapped_column(Double, nullable=False)


class Verdict(Base):
    """A detection verdict on an account: what a detector (or an admin) concluded, and when.

    Append-only: an account's current level is its latest verdict, so the history of how an
    account was judged (and by what) stays in the ledger for audits and forensics.
    """

    __tablename__ = "verdicts"
    __table_args__ = (Index("ix_verdicts_account_id", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Double, nullable=False)
    account_id: Mapped[str] = mapped_column(String(128), nullable=False)
    level: Mapped[int] = mapped_column(Integer, nullable=False)
    score: Mapped[float | None] = mapped_column(Double)
    reasons: Mapped[list | None] = mapped_column(JSONType)
    # who decided: "online" (the gateway's monitor), "admin", "offline" (an imported report)
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    # the request after which the verdict was reached (online), if any
    request_id: Mapped[str | None] = mapped_column(String(64))
    # the monitor lease holder that recorded it (online), so an audit can tell who wrote what
    holder: Mapped[str | None] = mapped_column(String(256))


class Lease(Base):
    """One holder at a time for a job that must run once per ledger (the ``monitor``).

    ``beat`` is bumped by the holder every ``ttl_s / 3`` seconds; a contender takes over only after
    watching it stand still for ``ttl_s`` on its own clock (``guard/detector_service.py``), so no
    two machines' wall clocks are compared. ``renewed_at`` is the holder's wall clock, for people.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256), nullable=False)
    beat: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ttl_s: Mapped[float] = mapped_column(Double, nullable=False)
    acquired_at: Mapped[float] = mapped_column(Double, nullable=False)
    renewed_at: Mapped[float] = mapped_column(Double, nullable=False)
