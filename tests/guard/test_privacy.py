"""What the ledger keeps of prompts and answers (``--ledger-content``, ``--redact``): the pure row
transformation on tiny inputs, then a real gateway in each mode."""

from __future__ import annotations

import hashlib
import json

import pytest

from distillguard.errors import ConfigError
from distillguard.guard.privacy import (LedgerPrivacy, compile_redactions, digest, parse_age, private_texts,
                                        private_value)

SHA_HI = hashlib.sha256(b"hi").hexdigest()
BODY = {"model": "tiny", "max_tokens": 5, "logprobs": True, "temperature": 0.5, "user": "alice@example.com",
        "stop": ["END"], "metadata": {"ticket": "T-1"},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_digest_is_the_sha256_of_the_utf8_text_and_its_length():
    assert digest("hi", "hashes") == {"sha256": SHA_HI, "chars": 2}
    assert digest("hi", "off") == {"chars": 2}
    assert digest("é", "hashes") == {"sha256": hashlib.sha256("é".encode()).hexdigest(), "chars": 1}
    # a lone surrogate (valid JSON, not UTF-8) is hashed, not an error that loses the row
    assert len(digest("\ud800", "hashes")["sha256"]) == 64


def test_hashes_keep_structure_and_numbers_and_hash_every_string():
    out = private_value(BODY, "hashes")
    assert {k: out[k] for k in ("model", "max_tokens", "logprobs", "temperature")} == \
           {"model": "tiny", "max_tokens": 5, "logprobs": True, "temperature": 0.5}
    assert [m["role"] for m in out["messages"]] == ["system", "user", "user"]
    assert out["messages"][1]["content"] == {"sha256": SHA_HI, "chars": 2}
    parts = json.dumps([{"type": "text", "text": "hi"}], ensure_ascii=False, sort_keys=True)
    assert out["messages"][2]["content"] == digest(parts, "hashes")
    assert out["user"]["chars"] == 17 and out["stop"][0]["chars"] == 3 and out["metadata"]["ticket"]["chars"] == 3
    assert not any(s in json.dumps(out) for s in ("alice", "be brief", "END", "T-1", '"hi"'))


def test_off_keeps_lengths_only():
    out = private_value(BODY, "off")
    assert out["messages"][1] == {"role": "user", "content": {"chars": 2}}
    assert "sha256" not in json.dumps(out) and "alice" not in json.dumps(out)


def test_redaction_in_full_mode_touches_text_not_structure():
    pattern = compile_redactions([r"[\w.+-]+@[\w-]+\.\w+", r"T-\d+"])
    out = private_value(BODY, "full", pattern)
    assert out["user"] == "[REDACTED]" and out["metadata"] == {"ticket": "[REDACTED]"}
    assert out["messages"][1] == {"role": "user", "content": "hi"} and out["model"] == "tiny"
    assert private_value(BODY, "full") == BODY  # no patterns: unchanged


def test_answers_in_each_mode():
    assert private_texts(["mail bob@x.org"], "full", compile_redactions([r"\S+@\S+"])) == "mail [REDACTED]"
    assert private_texts(["a", "b"], "full") == '["a", "b"]'  # n > 1: a JSON list, as the gateway stores it
    assert json.loads(private_texts(["hi"], "hashes")) == {"sha256": SHA_HI, "chars": 2}
    assert [d["chars"] for d in json.loads(private_texts(["hi", "abc"], "hashes"))] == [2, 3]
    assert private_texts(["hi"], "off") is None and private_texts([], "hashes") is None


def test_a_row_is_transformed_in_one_place():
    row = {"request_id": "r", "request_body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
           "response_text": "yo", "prompt_tokens": 3}
    assert LedgerPrivacy().row(row, ["yo"]) is row
    hashed = LedgerPrivacy("hashes").row(row, ["yo"])
    assert hashed["prompt_tokens"] == 3 and hashed["request_body"]["messages"][0]["content"]["sha256"] == SHA_HI
    assert json.loads(hashed["response_text"])["chars"] == 2 and row["response_text"] == "yo"  # not mutated


def test_bad_settings_name_the_value():
    with pytest.raises(ConfigError, match=r"--redact '\(unclosed' is not a valid regular expression"):
        LedgerPrivacy(redact=("(unclosed",))
    with pytest.raises(ConfigError, match="--ledger-content 'some': use one of full, hashes, off"):
        LedgerPrivacy("some")  # type: ignore[arg-type]


def test_ages_parse_or_name_the_fix():
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("1.5m") == 90
    assert parse_age("2w") == 14 * 86400 and parse_age("45s") == 45
    with pytest.raises(ConfigError, match=r"--older-than '30 days': give a number and a unit, e.g. 30d"):
        parse_age("30 days")


def test_ledger_prune_deletes_old_rows_and_idempotent_responses(tmp_path):
    import time

    from sqlalchemy import insert, select

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.schema import IdempotentResponse, LedgerRow, Verdict
    from tests.servers import run_cli

    db = str(tmp_path / "ledger.db")
    engine = make_engine(db)
    migrate(engine)
    now, day = time.time(), 86400.0
    ages = {"r-40d": 40 * day, "r-31d": 31 * day, "r-29d": 29 * day, "r-now": 0.0}
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), [{"request_id": rid, "ts": now - age, "account_id": "a", "status": 200,
                                          "stream": False, "request_body": {"messages": []}} for rid, age in ages.items()])
        conn.execute(insert(IdempotentResponse), [
            {"account_id": "a", "key": k, "request_hash": "h", "request_id": k, "response": {}, "created_at": now - age}
            for k, age in (("old", 35 * day), ("new", day))])
        conn.execute(insert(Verdict), [{"ts": now - 60 * day, "account_id": "a", "level": 1, "source": "admin"}])
    out = run_cli("ledger", "prune", "--older-than", "30d", "--db", db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deleted 2 requests and 1 idempotent responses from before ")
    with engine.connect() as conn:
        assert sorted(conn.execute(select(LedgerRow.request_id)).scalars()) == ["r-29d", "r-now"]
        assert list(conn.execute(select(IdempotentResponse.key)).scalars()) == ["new"]
        assert len(conn.execute(select(Verdict.id)).all()) == 1  # the audit trail stays
    again = run_cli("ledger", "prune", "--older-than", "30d", "--db", db)
    assert again.stdout.startswith("deleted 0 requests and 0 idempotent responses")
    bad = run_cli("ledger", "prune", "--older-than", "a month", "--db", db)
    assert bad.returncode == 2 and "give a number and a unit" in bad.stderr and "Traceback" not in bad.stderr
    engine.dispose()


def test_prune_deletes_in_batches(tmp_path):
    from sqlalchemy import func, insert, select

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.privacy import prune
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(str(tmp_path / "ledger.db"))
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), [{"request_id": f"r{i}", "ts": float(i), "status": 200, "stream": False}
                                         for i in range(25)])
    assert prune(engine, before=20.0, batch=7) == {"requests": 20, "idempotent_responses": 0}
    with engine.connect() as conn:
        assert conn.execute(select(func.min(LedgerRow.ts))).scalar() == 20.0
    engine.dispose()
