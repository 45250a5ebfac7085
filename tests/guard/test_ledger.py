"""The ledger writer (group commit, durability before acknowledgement) and traffic export/import."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from sqlalchemy import func, select

from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.ledger import Ledger, account_usage, export_traffic, import_traffic
from distillguard.guard.schema import LedgerRow


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def _row(i: int, account: str = "acct-1") -> dict:
    return {
        "request_id": f"req-{i}",
        "ts": 1_700_000_000.0 + i,
        "account_id": account,
        "key_id": "key_x",
        "client_ip": "127.0.0.1",
        "model": "tiny",
        "request_body": {"model": "tiny", "messages": [{"role": "user", "content": f"q{i} é"}]},
        "response_text": f"answer {i}",
        "prompt_tokens": 10 + i,
        "completion_tokens": 5,
        "latency_ms": 1.5,
        "status": 200,
        "stream": False,
    }


def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(LedgerRow)).scalar_one()


def test_rows_are_committed_when_record_returns_and_batched(engine):
    async def main():
        ledger = Ledger(engine)
        ledger.start()
        await asyncio.gather(*(ledger.record(_row(i)) for i in range(300)))
        committed = _count(engine)  # read on another connection: already durable
        await ledger.close()
        return ledger, committed

    ledger, committed = asyncio.run(main())
    assert committed == 300
    assert ledger.rows_written == 300
    assert ledger.batches < 300  # concurrent rows shared commits (group commit)


def test_failed_write_is_reported_not_acknowledged(engine):
    from distillguard.guard.ledger import LedgerUnavailable

    async def main():
        ledger = Ledger(engine, retries=1)
        ledger.start()
        await ledger.record(_row(1))
        with pytest.raises(LedgerUnavailable):
            await ledger.record(_row(1))  # duplicate request_id: the database refuses it
        await ledger.close()

    asyncio.run(main())
    assert _count(engine) == 1


def test_a_row_that_raises_anything_fails_alone_and_the_writer_lives_on(engine, caplog):
    """Before: a row whose write raised anything but a SQLAlchemyError (a lone surrogate:
    UnicodeEncodeError in the driver) killed the writer thread, and every later request hung.
    Now each such row fails alone (its client gets a 503), a stub row records the refusal, its
    batch-mates and every later row commit."""
    from distillguard.guard.ledger import LedgerUnavailable

    async def main():
        ledger = Ledger(engine, retries=1)
        ledger.start()
        rows = [_row(i) for i in range(12)]
        rows[3]["response_text"] = (
            "private answer \ud800"  # no UTF-8 encoder takes a lone surrogate
        )
        rows[8]["request_body"]["bad"] = object()  # json cannot serialise it
        results = await asyncio.gather(*(ledger.record(r) for r in rows), return_exceptions=True)
        later = await asyncio.gather(*(ledger.record(_row(i)) for i in range(100, 110)))
        alive = ledger.problem()
        await ledger.close()
        return ledger, results, later, alive

    ledger, results, later, alive = asyncio.run(main())
    assert [i for i, r in enumerate(results) if isinstance(r, LedgerUnavailable)] == [3, 8]
    assert all(r is None for i, r in enumerate(results) if i not in (3, 8)) and later == [None] * 10
    assert alive is None and ledger.rows_refused == 2
    with engine.connect() as conn:
        got = {r.request_id: r for r in conn.execute(select(LedgerRow))}
    assert len(got) == 22
    for bad in ("req-3", "req-8"):  # the request is on record, without the content that was refused
        assert (got[bad].status, got[bad].error_code, got[bad].response_text) == (
            503,
            "ledger_refused",
            None,
        )
        assert set(got[bad].request_body) == {"_unstorable"}
    assert got["req-4"].response_text == "answer 4" and got["req-104"].status == 200
    assert (
        "req-3" in caplog.text and "private answer" not in caplog.text
    )  # the log names rows, not content


def test_a_wedged_ledger_answers_503_in_bounded_time_and_fails_the_health_check(tmp_path):
    """A writer that cannot commit (here: another process holds SQLite's write lock) makes
    ``record`` give up after ``wait_s`` with a 503 instead of hanging, and ``problem`` report it
    once a row has waited ``wedged_s``; when the lock goes, the rows commit and it clears."""
    import sqlite3

    from distillguard.guard.ledger import LedgerUnavailable

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    locker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)

    async def main():
        ledger = Ledger(engine, wait_s=0.5, wedged_s=0.2)
        ledger.start()
        assert ledger.problem() is None
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerUnavailable, match="did not commit within 0.5 s"):
            await ledger.record(_row(1))
        wedged = ledger.problem()
        locker.execute("ROLLBACK")
        await ledger.record(_row(2))  # the writer recovers by itself
        recovered = ledger.problem()
        await ledger.close()
        return wedged, recovered, ledger.problem()

    wedged, recovered, closed = asyncio.run(main())
    locker.close()
    assert wedged is not None and "has not committed a row queued" in wedged
    assert recovered is None
    assert closed == "the ledger writer is not running"
    assert _count(engine) == 2  # the row that timed out was still written once the lock went
    engine.dispose()


def test_unknown_columns_are_rejected(engine):
    async def main():
        ledger = Ledger(engine)
        with pytest.raises(ValueError, match="unknown ledger columns"):
            ledger.submit({**_row(1), "api_key": "dg-secret"})

    asyncio.run(main())


def test_export_import_round_trip_is_idempotent(engine, tmp_path):
    records = [
        {
            "ts": 1732800000.25 + i,
            "account": f"acct-{i % 3}",
            "ip": "10.1.2.3",
            "request": {
                "model": "m",
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 512,
                "logprobs": True,
                "top_logprobs": 5,
            },
            "response": {"usage": {"prompt_tokens": 31, "completion_tokens": 212}},
            "label": "benign" if i % 2 else "attack",
        }
        for i in range(50)
    ]
    lines = [json.dumps(r) + "\n" for r in records]
    assert import_traffic(engine, lines) == 50
    assert import_traffic(engine, lines) == 50  # read again ...
    assert _count(engine) == 50  # ... but stored once
    out = io.StringIO()
    assert export_traffic(engine, out) == 50
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    for original, back in zip(records, exported):
        for key in ("ts", "account", "ip", "request", "label"):
            assert back[key] == original[key]
        assert back["response"]["usage"] == original["response"]["usage"]
    since = io.StringIO()
    assert export_traffic(engine, since, since=records[40]["ts"]) == 10
    usage = {u["account"]: u for u in account_usage(engine)}
    assert usage["acct-0"]["requests"] == 17 and usage["acct-0"]["total_tokens"] == 17 * 243


@pytest.mark.parametrize(
    "line,fragment",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"account": "a", "request": {}}', "'ts'"),
        ('{"ts": 1, "request": {}}', "'account'"),
        ('{"ts": 1, "account": "a", "request": "hi"}', "'request'"),
        ('{"ts": true, "account": "a", "request": {}}', "'ts'"),
    ],
)
def test_bad_traffic_lines_name_the_line(engine, line, fragment):
    good = json.dumps({"ts": 1, "account": "a", "request": {}})
    with pytest.raises(ConfigError) as info:
        import_traffic(engine, [good + "\n", line + "\n"], source="t.jsonl")
    assert "t.jsonl:2" in str(info.value) and fragment in str(info.value)


def test_nul_characters_are_stored_and_fail_no_batch_mate(engine):
    """PostgreSQL refuses NUL in text and jsonb; a model can generate one and a client can send
    one. Such a row is stored with U+FFFD in place of each NUL, and the rows committed with it in
    the same group commit are not failed."""

    async def main():
        ledger = Ledger(engine, retries=1)
        ledger.start()
        rows = [_row(i) for i in range(20)]
        rows[7]["response_text"] = "bad\x00answer"
        rows[7]["request_body"]["messages"][0]["content"] = "q\x00"
        rows[7]["request_body"]["\x00key"] = 1
        await asyncio.gather(*(ledger.record(r) for r in rows))
        await ledger.close()

    asyncio.run(main())
    with engine.connect() as conn:
        got = {r.request_id: r for r in conn.execute(select(LedgerRow))}
    assert len(got) == 20
    assert got["req-7"].response_text == "bad\ufffdanswer"
    assert got["req-7"].request_body["messages"][0]["content"] == "q\ufffd"
    assert got["req-7"].request_body["\ufffdkey"] == 1
    assert got["req-3"].response_text == "answer 3"


def test_an_idempotent_replay_returns_a_nul_exactly_as_it_was_sent(engine, db_url):
    """A model can generate NUL (the tiny random model did, once, in CI); the ledger row keeps
    U+FFFD in its place, but the response replayed under an Idempotency-Key must be the one the
    client was sent, on PostgreSQL as on SQLite."""
    from distillguard.guard.gateway import Guard, GuardConfig, RequestLog

    async def main():
        guard = Guard(GuardConfig(db=db_url, watermark=False))
        await guard.start()
        key, _ = guard.keys.create("nul-acct")
        sent = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "<\x00D\ufffdU\x00"},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 6},
        }
        first = RequestLog(client_ip="127.0.0.1", key=key, idempotency_key="k1", request_hash="h1")
        first.add_response(sent)
        await guard.recorder.finish(first)
        again = RequestLog(client_ip="127.0.0.1", key=key, idempotency_key="k1", request_hash="h1")
        replayed = await guard.claims.replay(again)
        await guard.close()
        return sent, replayed

    sent, replayed = asyncio.run(main())
    assert replayed == sent
    with engine.connect() as conn:
        row = conn.execute(select(LedgerRow).where(LedgerRow.account_id == "nul-acct")).one()
    assert row.response_text == "<\ufffdD\ufffdU\ufffd"
