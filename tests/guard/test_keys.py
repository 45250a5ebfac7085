"""API keys: shown once, stored hashed, revocable, limits validated."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.keys import KeyStore, hash_key
from distillguard.guard.limits import Limits


@pytest.fixture
def store(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    yield KeyStore(engine)
    engine.dispose()


def test_create_lookup_revoke(store):
    record, secret = store.create("acme", limits=Limits(rpm=60, daily_tokens=10_000), name="ci")
    assert secret.startswith("dg-") and len(secret) > 40
    assert store.lookup(secret) == record
    assert record.limits == Limits(rpm=60, daily_tokens=10_000)
    assert store.lookup(secret + "x") is None and store.lookup("") is None
    other, other_secret = store.create("acme")
    assert [k.id for k in store.list("acme")] == [record.id, other.id]
    revoked = store.revoke(record.id)
    assert revoked.revoked_at is not None and not revoked.active
    assert store.lookup(secret) is None
    assert store.lookup(other_secret) == other
    assert store.revoke(record.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(ConfigError, match="no key with id"):
        store.revoke("key_nope")


def test_only_the_hash_is_stored(store):
    _, secret = store.create("acme")
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    assert secret not in dump and secret[8:] not in dump
    assert hash_key(secret) in dump
    assert "key_hash" not in store.list()[0].public()


@pytest.mark.parametrize("account,limits,fragment", [
    ("", {}, "invalid account name"),
    ("x" * 129, {}, "invalid account name"),
    ("acme", {"rpm": 0}, "rpm=0 is invalid"),
    ("acme", {"daily_tokens": -5}, "daily_tokens=-5 is invalid"),
])
def test_bad_key_requests(store, account, limits, fragment):
    with pytest.raises(ConfigError, match=fragment):
        store.create(account, limits=Limits(**limits))
    assert store.list() == []
