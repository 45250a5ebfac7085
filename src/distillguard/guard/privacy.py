"""What the ledger keeps of what people ask and are answered (issue 24, "Privacy of the ledger").

A ledger row holds the request body and the answer's text. ``serve --ledger-content`` chooses
how much of that text is stored; everything else (time, account, key, IP, model, sampling
parameters, roles, token counts, status, policy action, watermark key id) is stored in every mode:

``full`` (default)
    The request body and the answers as sent, less the matches of ``--redact`` patterns, stored
    as ``[REDACTED]``.
``hashes``
    Every string the client sent (message contents, ``stop``, ``user``, metadata values, ...)
    becomes ``{"sha256": HEX, "chars": N}``: the SHA-256 of its UTF-8 text (of its canonical JSON
    for a list of content parts) and its length. Each answer likewise, stored as that object's
    JSON in ``response_text`` (a JSON list of them for ``n`` > 1). Keys, numbers, booleans,
    ``model``, ``role`` and ``type`` are kept. Whoever holds a text can check whether it was sent;
    nobody can read the ledger back into text.
``off``
    As ``hashes`` without the hash: ``{"chars": N}``; no answer text at all.

What each mode costs (the detectors are in ``distillguard.detect``):

========================  ======  ===========================================================
what                      full    hashes / off
========================  ======  ===========================================================
volume, timing, shape,    yes     yes: they read times, token counts, parameters and roles
fresh
template, cot, mmd,       yes     no: they read prompt text (template skeletons, reasoning
prada, coverage                   markers, MiniLM embeddings); ``distillguard detect`` warns
                                  and they score such requests as if they said nothing
linking                   yes     IP networks, shared system prompts and (``hashes`` only)
                                  exact-duplicate prompts, by their hash; near-duplicates and
                                  shared templates need text
watermark tracing         yes     no: it reads answer text (``forensics``, ``watermark detect``
from the ledger                   on an export)
replay of an              yes     yes: the answer kept under an ``Idempotency-Key`` is stored
Idempotency-Key                   verbatim in every mode (a retry must get the same bytes);
                                  ``distillguard ledger prune`` deletes it with the rows
========================  ======  ===========================================================

Measured (``bench/ledger_privacy.py`` -> ``bench/results/ledger_privacy.json``; small: 100 benign
accounts over 2 days, 3 attackers a kind, target FPR 0.001): with text every campaign kind is
flagged and no benign account; kept as hashes *and calibrated on hashes*, bulk, template,
reasoning and logprobs harvesters are still all flagged, slow-and-low ones none and hydra 5 of
20 keys (``off``: 0 of 20; it loses identical-prompt linking); no benign account either way. A
calibration made on text scores hashed traffic against a threshold twice too high (91 vs 45)
and flags nothing: calibrate on traffic kept the same way.

Online detection (``serve --detect``) is fed each request as it was sent, in memory, before this
transformation: what the gateway can detect live does not depend on what it stores.

Redaction applies in ``full`` mode, to every string of the request body but ``model``, ``role``
and ``type``, and to the answers; the patterns are Python regular expressions chosen by the
operator (a pattern that backtracks catastrophically slows every ledger write).

Retention is separate: ``distillguard ledger prune --older-than 30d``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from distillguard.errors import ConfigError

LedgerContent = Literal["full", "hashes", "off"]
CONTENT_MODES: tuple[str, ...] = ("full", "hashes", "off")
REDACTED = "[REDACTED]"
# Strings that name the request's structure, not what a person wrote: kept in every mode.
STRUCTURAL_KEYS = frozenset({"model", "role", "type"})


def compile_redactions(patterns: tuple[str, ...] | list[str]) -> re.Pattern | None:
    """One regex matching any of ``patterns``; None for none. A bad pattern is a ConfigError naming it."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(
                f"--redact {p!r} is not a valid regular expression ({exc}); "
                r"quote it for the shell, e.g. --redact '[\w.+-]+@[\w-]+\.[\w.]+'"
            ) from None
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def digest(text: str, content: LedgerContent) -> dict:
    """``{"sha256", "chars"}`` of ``text`` (``hashes``) or ``{"chars"}`` (``off``).

    Lone surrogates (valid JSON, not valid UTF-8) are hashed as they came (``surrogatepass``)
    rather than make the row unwritable."""
    if content == "off":
        return {"chars": len(text)}
    return {
        "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        "chars": len(text),
    }


def private_value(
    value, content: LedgerContent, redact: re.Pattern | None = None, *, key: str | None = None
):
    """A JSON value of a request body as the ledger stores it (see the module docstring)."""
    if content != "full" and key == "content" and isinstance(value, list):
        # a message's content parts: one digest of their canonical JSON, as for a string content
        return digest(json.dumps(value, ensure_ascii=False, sort_keys=True), content)
    if isinstance(value, str):
        if key in STRUCTURAL_KEYS:
            return value
        if content == "full":
            return redact.sub(REDACTED, value) if redact is not None else value
        return digest(value, content)
    if isinstance(value, dict):
        return {k: private_value(v, content, redact, key=k) for k, v in value.items()}
    if isinstance(value, list):
        return [private_value(v, content, redact) for v in value]
    return value  # numbers, booleans, null


def private_texts(
    texts: list[str], content: LedgerContent, redact: re.Pattern | None = None
) -> str | None:
    """The answers' ``response_text`` column: one choice's text, or a JSON list for ``n`` > 1
    (as the gateway stores them); in ``hashes`` the JSON of each :func:`digest`; None in ``off``."""
    if not texts or content == "off":
        return None
    if content == "full":
        stored = [redact.sub(REDACTED, t) if redact is not None else t for t in texts]
        return stored[0] if len(stored) == 1 else json.dumps(stored, ensure_ascii=False)
    hashed = [digest(t, content) for t in texts]
    return json.dumps(hashed[0] if len(hashed) == 1 else hashed)


@dataclass(frozen=True)
class LedgerPrivacy:
    """The ledger's content mode and redactions (``serve --ledger-content``, ``--redact``)."""

    content: LedgerContent = "full"
    redact: tuple[str, ...] = ()
    _pattern: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.content not in CONTENT_MODES:
            raise ConfigError(
                f"--ledger-content {self.content!r}: use one of {', '.join(CONTENT_MODES)}"
            )
        object.__setattr__(self, "_pattern", compile_redactions(self.redact))

    @property
    def verbatim(self) -> bool:
        return self.content == "full" and self._pattern is None

    def row(self, row: dict, texts: list[str]) -> dict:
        """The ledger row to store for ``row`` (``RequestLog.row()``), whose answers are ``texts``."""
        if self.verbatim:
            return row
        body = row.get("request_body")
        return {
            **row,
            "request_body": None
            if body is None
            else private_value(body, self.content, self._pattern),
            "response_text": private_texts(texts, self.content, self._pattern),
        }


# ---- retention ------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if match is None:
        raise ConfigError(
            f"--older-than {text!r}: give a number and a unit, e.g. 30d, 12h, 90m, 45s or 2w"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def prune(engine, before: float, *, batch: int = 10_000) -> dict[str, int]:
    """Delete ledger rows (``ts``) and idempotent responses (``created_at``) older than ``before``
    (epoch seconds); returns how many of each went. Verdicts stay: they are the audit trail of how
    accounts were judged, and hold no prompt or answer.

    Rows go in batches of ``batch``, each its own transaction, so a running gateway's ledger
    writer waits at most one batch. On SQLite, ``secure_delete`` overwrites the deleted content
    and a WAL checkpoint truncates the log that still held it; PostgreSQL keeps the old tuples
    until its next VACUUM (autovacuum, or ``VACUUM`` by hand)."""
    from sqlalchemy import delete, select, text

    from distillguard.guard.schema import IdempotentResponse, LedgerRow

    sqlite = engine.dialect.name == "sqlite"
    counts = {"requests": 0, "idempotent_responses": 0}
    with engine.connect() as conn:
        if sqlite:
            conn.execute(
                text("PRAGMA secure_delete=ON")
            )  # this connection's deletes zero their pages
            conn.commit()
        while True:
            with conn.begin():
                ids = (
                    select(LedgerRow.id).where(LedgerRow.ts < before).limit(batch).scalar_subquery()
                )
                gone = conn.execute(delete(LedgerRow).where(LedgerRow.id.in_(ids))).rowcount
            counts["requests"] += gone
            if gone < batch:
                break
        with conn.begin():
            counts["idempotent_responses"] = conn.execute(
                delete(IdempotentResponse).where(IdempotentResponse.created_at < before)
            ).rowcount
        if sqlite:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            conn.commit()
    return counts
