"""API keys: shown once, stored hashed, revocable, limits validated."""

from __future__ import annotations

import time

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


@pytest.mark.parametrize(
    "account,limits,fragment",
    [
        ("", {}, "invalid account name"),
        ("x" * 129, {}, "invalid account name"),
        ("acme", {"rpm": 0}, "rpm=0 is invalid"),
        ("acme", {"daily_tokens": -5}, "daily_tokens=-5 is invalid"),
    ],
)
def test_bad_key_requests(store, account, limits, fragment):
    with pytest.raises(ConfigError, match=fragment):
        store.create(account, limits=Limits(**limits))
    assert store.list() == []


@pytest.mark.parametrize("account", ["a\u0000b", "a/b", "tab\t", "é", "x\ud800", " acme"])
def test_account_names_outside_the_pattern_are_refused(store, account):
    with pytest.raises(ConfigError, match=r"invalid account name .*\[A-Za-z0-9\._@:\+-\]"):
        store.create(account)
    with pytest.raises(ConfigError, match="invalid account name"):
        store.set_account_limits(account, Limits(rpm=1))
    assert store.list() == []


def test_rotate_keeps_account_limits_and_models_and_gives_the_old_key_a_grace_period(store):
    old, old_secret = store.create(
        "acme", limits=Limits(rpm=7, daily_usd=2.5), name="ci", models=["tiny", "big"]
    )
    new, new_secret, replaced = store.rotate(old.id, grace_s=3600)
    assert (new.account, new.limits, new.name, new.models, new.rotated_from) == (
        "acme",
        old.limits,
        "ci",
        ("tiny", "big"),
        old.id,
    )
    assert new.expires_at is None and new_secret != old_secret
    assert replaced.expires_at == pytest.approx(time.time() + 3600, abs=60)
    assert not store.lookup(old_secret).expired() and store.lookup(new_secret) == new
    # a second rotation with a shorter grace shortens it; a longer one never extends it
    store.rotate(old.id, grace_s=0)
    assert store.lookup(old_secret).expired()
    store.rotate(old.id, grace_s=7200)
    assert store.lookup(old_secret).expired()


def test_rotate_refuses_unknown_and_revoked_keys_and_unbounded_grace(store):
    record, _ = store.create("acme")
    with pytest.raises(ConfigError, match="no key with id"):
        store.rotate("key_nope", grace_s=0)
    with pytest.raises(ConfigError, match="grace=inf is invalid"):
        store.rotate(record.id, grace_s=float("inf"))
    store.revoke(record.id)
    with pytest.raises(ConfigError, match="is revoked"):
        store.rotate(record.id, grace_s=0)
    assert len(store.list()) == 1


@pytest.mark.parametrize(
    "models,fragment",
    [
        ([], "give 1-100 model ids"),
        ("tiny", "give 1-100 model ids"),
        (["x" * 257], "is invalid"),
        (["a\nb"], "printable"),
        ([f"m{i}" for i in range(101)], "give 1-100"),
    ],
)
def test_bad_model_allowlists_are_refused(store, models, fragment):
    with pytest.raises(ConfigError, match=fragment):
        store.create("acme", models=models)


def test_account_limits_round_trip_and_come_with_each_key(store):
    record, secret = store.create("acme", limits=Limits(rpm=5))
    assert store.account_limits("acme") == Limits() == record.account_limits
    assert store.account_limits("nobody") == Limits()
    store.set_account_limits("acme", Limits(rpm=50, daily_tokens=10**6, daily_usd=3.25))
    assert store.lookup(secret).account_limits == Limits(rpm=50, daily_tokens=10**6, daily_usd=3.25)
    assert store.lookup(secret).limits == Limits(rpm=5)
    store.set_account_limits("newco", Limits(max_concurrent=2))  # an account without keys yet
    assert store.account_limits("newco") == Limits(max_concurrent=2)
