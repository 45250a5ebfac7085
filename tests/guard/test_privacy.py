"""What the ledger keeps of prompts and answers (``--ledger-content``, ``--redact``): the pure row
transformation on tiny inputs, then a real gateway in each mode."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from distillguard.errors import ConfigError
from distillguard.guard.privacy import (
    LedgerPrivacy,
    compile_redactions,
    digest,
    parse_age,
    private_texts,
    private_value,
)

SHA_HI = hashlib.sha256(b"hi").hexdigest()
BODY = {
    "model": "tiny",
    "max_tokens": 5,
    "logprobs": True,
    "temperature": 0.5,
    "user": "alice@example.com",
    "stop": ["END"],
    "metadata": {"ticket": "T-1"},
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ],
}


def test_digest_is_the_sha256_of_the_utf8_text_and_its_length():
    assert digest("hi", "hashes") == {"sha256": SHA_HI, "chars": 2}
    assert digest("hi", "off") == {"chars": 2}
    assert digest("é", "hashes") == {"sha256": hashlib.sha256("é".encode()).hexdigest(), "chars": 1}
    # a lone surrogate (valid JSON, not UTF-8) is hashed, not an error that loses the row
    assert len(digest("\ud800", "hashes")["sha256"]) == 64


def test_hashes_keep_structure_and_numbers_and_hash_every_string():
    out = private_value(BODY, "hashes")
    assert {k: out[k] for k in ("model", "max_tokens", "logprobs", "temperature")} == {
        "model": "tiny",
        "max_tokens": 5,
        "logprobs": True,
        "temperature": 0.5,
    }
    assert [m["role"] for m in out["messages"]] == ["system", "user", "user"]
    assert out["messages"][1]["content"] == {"sha256": SHA_HI, "chars": 2}
    parts = json.dumps([{"type": "text", "text": "hi"}], ensure_ascii=False, sort_keys=True)
    assert out["messages"][2]["content"] == digest(parts, "hashes")
    assert (
        out["user"]["chars"] == 17
        and out["stop"][0]["chars"] == 3
        and out["metadata"]["ticket"]["chars"] == 3
    )
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
    assert (
        private_texts(["mail bob@x.org"], "full", compile_redactions([r"\S+@\S+"]))
        == "mail [REDACTED]"
    )
    assert (
        private_texts(["a", "b"], "full") == '["a", "b"]'
    )  # n > 1: a JSON list, as the gateway stores it
    assert json.loads(private_texts(["hi"], "hashes")) == {"sha256": SHA_HI, "chars": 2}
    assert [d["chars"] for d in json.loads(private_texts(["hi", "abc"], "hashes"))] == [2, 3]
    assert private_texts(["hi"], "off") is None and private_texts([], "hashes") is None


def test_a_row_is_transformed_in_one_place():
    row = {
        "request_id": "r",
        "request_body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        "response_text": "yo",
        "prompt_tokens": 3,
    }
    assert LedgerPrivacy().row(row, ["yo"]) is row
    hashed = LedgerPrivacy("hashes").row(row, ["yo"])
    assert (
        hashed["prompt_tokens"] == 3
        and hashed["request_body"]["messages"][0]["content"]["sha256"] == SHA_HI
    )
    assert (
        json.loads(hashed["response_text"])["chars"] == 2 and row["response_text"] == "yo"
    )  # not mutated


def test_bad_settings_name_the_value():
    with pytest.raises(
        ConfigError, match=r"--redact '\(unclosed' is not a valid regular expression"
    ):
        LedgerPrivacy(redact=("(unclosed",))
    with pytest.raises(ConfigError, match="--ledger-content 'some': use one of full, hashes, off"):
        LedgerPrivacy("some")  # type: ignore[arg-type]


def test_ages_parse_or_name_the_fix():
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("1.5m") == 90
    assert parse_age("2w") == 14 * 86400 and parse_age("45s") == 45
    with pytest.raises(
        ConfigError, match=r"--older-than '30 days': give a number and a unit, e.g. 30d"
    ):
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
        conn.execute(
            insert(LedgerRow),
            [
                {
                    "request_id": rid,
                    "ts": now - age,
                    "account_id": "a",
                    "status": 200,
                    "stream": False,
                    "request_body": {"messages": []},
                }
                for rid, age in ages.items()
            ],
        )
        conn.execute(
            insert(IdempotentResponse),
            [
                {
                    "account_id": "a",
                    "key": k,
                    "request_hash": "h",
                    "request_id": k,
                    "response": {},
                    "created_at": now - age,
                }
                for k, age in (("old", 35 * day), ("new", day))
            ],
        )
        conn.execute(
            insert(Verdict),
            [{"ts": now - 60 * day, "account_id": "a", "level": 1, "source": "admin"}],
        )
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
    assert (
        bad.returncode == 2
        and "give a number and a unit" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    engine.dispose()


def test_prune_deletes_in_batches(tmp_path):
    from sqlalchemy import func, insert, select

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.privacy import prune
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(str(tmp_path / "ledger.db"))
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(LedgerRow),
            [
                {"request_id": f"r{i}", "ts": float(i), "status": 200, "stream": False}
                for i in range(25)
            ],
        )
    assert prune(engine, before=20.0, batch=7) == {"requests": 20, "idempotent_responses": 0}
    with engine.connect() as conn:
        assert conn.execute(select(func.min(LedgerRow.ts))).scalar() == 20.0
    engine.dispose()


# ---- detection on what a private ledger keeps ------------------------------------------------


def hashed_record(
    account: str, ts: float, prompt: str, mode: str = "hashes", system: str | None = None
) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return {
        "ts": ts,
        "account": account,
        "ip": None,
        "request": private_value({"model": "m", "messages": messages, "max_tokens": 64}, mode),
    }


def test_features_of_a_hashed_prompt_identify_it_without_its_text():
    from distillguard.detect.features import extract, without_text

    a, b, c = (
        extract(hashed_record("x", 1.0, p, system="sys"))
        for p in ("same words here", "same words here", "other")
    )
    assert (
        not a.has_text
        and a.prompt == ""
        and a.template is None
        and not a.cot
        and a.max_tokens == 64
    )
    assert a.prompt_hash == b.prompt_hash != c.prompt_hash
    assert a.system_hash == SHA_SYS[:16] and without_text(hashed_record("x", 1.0, "p"))
    off = extract(hashed_record("x", 1.0, "same words here", "off", system="sys"))
    assert not off.has_text and off.prompt_hash == "" and off.system_hash is None
    full = {
        "ts": 1.0,
        "account": "x",
        "request": {"messages": [{"role": "user", "content": "hello"}]},
    }
    assert extract(full).has_text and not without_text(full)


SHA_SYS = hashlib.sha256(b"sys").hexdigest()


def test_linking_still_sees_identical_prompts_in_a_hashed_ledger():
    from distillguard.detect.features import extract
    from distillguard.detect.linking import Linker

    def linker_over(mode: str) -> Linker:
        linker = Linker()
        for i in range(
            20
        ):  # two keys of one campaign send the same 20 prompts; five people their own
            for bot in ("bot-1", "bot-2"):
                linker.observe(
                    extract(hashed_record(bot, float(i), f"extract the teacher, item {i}", mode))
                )
            for p in range(5):
                linker.observe(
                    extract(
                        hashed_record(f"person-{p}", float(i), f"question {i} of person {p}", mode)
                    )
                )
        return linker

    hashed = linker_over("hashes")
    assert hashed.cluster_id("bot-1") is not None and hashed.cluster_id(
        "bot-1"
    ) == hashed.cluster_id("bot-2")
    assert all(hashed.cluster_size(f"person-{p}") == 1 for p in range(5))
    lengths = linker_over("off")  # lengths only: nothing to link by
    assert lengths.cluster_size("bot-1") == 1


@pytest.fixture(scope="module", params=["hashes", "off", "full-redacted"])
def private_gateway(request, tmp_path_factory):
    from tests.servers import serve_process

    db = f"sqlite:///{tmp_path_factory.mktemp('private') / 'ledger.db'}"
    mode = request.param.split("-")[0]  # "full-redacted": full, with two --redact patterns
    extra = ("--redact", r"secret-\w+", "--redact", r"\d{3}-\d{4}") if mode == "full" else ()
    with serve_process(
        "--model",
        "tiny",
        "--db",
        db,
        "--ledger-content",
        mode,
        *extra,
        env={"DISTILLGUARD_ADMIN_KEY": ADMIN},
    ) as url:
        yield url, db, mode


ADMIN = "admin-privacy-test"


def test_the_ledger_keeps_what_its_mode_says(private_gateway):
    import httpx
    from sqlalchemy import select

    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow

    url, db, mode = private_gateway
    key = httpx.post(
        f"{url}/admin/keys", json={"account": "p"}, headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()["key"]
    prompt = "call secret-abc at 555-1234 please"
    auth = {"Authorization": f"Bearer {key}"}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "seed": 1,
        "user": "alice",
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60).json()
    text = answer["choices"][0]["message"]["content"]
    streamed = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=auth, timeout=60
    )
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    engine = make_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(
            select(*LedgerRow.__table__.columns)
            .where(LedgerRow.account_id == "p")
            .order_by(LedgerRow.id)
        ).all()
    engine.dispose()
    assert len(rows) == 2 and all(r.prompt_tokens and r.completion_tokens for r in rows)
    assert [r.request_body["messages"][0]["role"] for r in rows] == ["user", "user"]
    stored = rows[0].request_body["messages"][0]["content"]
    if mode == "full":
        assert (
            stored == "call [REDACTED] at [REDACTED] please"
            and rows[0].request_body["user"] == "alice"
        )
        assert rows[0].response_text == text  # nothing in the tiny model's answer matches
    elif mode == "hashes":
        assert stored == {
            "sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "chars": len(prompt),
        }
        assert json.loads(rows[0].response_text) == digest(text, "hashes")
        assert rows[0].request_body["user"]["chars"] == 5
    else:
        assert (
            stored == {"chars": len(prompt)}
            and rows[0].response_text is None
            and rows[1].response_text is None
        )
    everything = json.dumps([[r.request_body, r.response_text] for r in rows])
    assert "secret-abc" not in everything and "555-1234" not in everything
    if mode != "full":
        assert "alice" not in everything and (
            not text.strip() or json.dumps(text)[1:-1] not in everything
        )


@pytest.mark.parametrize("private_gateway", ["hashes", "off"], indirect=True)
def test_detect_runs_on_a_private_ledger_and_says_what_it_cannot_see(private_gateway, tmp_path):
    import random

    import httpx

    from tests.detect.synth import benign_account
    from tests.servers import run_cli

    url, db, mode = private_gateway
    key = httpx.post(
        f"{url}/admin/keys", json={"account": "q"}, headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()["key"]
    sent = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 3,
        },
    )
    assert sent.status_code == 200
    rng = random.Random(0)
    benign = tmp_path / "benign.jsonl"
    benign.write_text(
        "".join(
            json.dumps(r) + "\n" for i in range(40) for r in benign_account(rng, f"b{i}", days=2)
        )
    )
    out = run_cli(
        "detect",
        "--ledger",
        db,
        "--calibrate",
        str(benign),
        "--target-fpr",
        "0.05",
        "--json",
        env={"COLUMNS": "400"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"(\d+) of \1 requests to score carry no prompt text", out.stderr), out.stderr
    assert "template, cot, mmd, prada and coverage" in out.stderr
    report = json.loads(out.stdout)
    assert "q" in {a["account"] for a in report["accounts"]}


def test_online_detection_sees_the_request_as_sent_while_the_ledger_keeps_hashes(tmp_path):
    """The monitor is fed in memory before the row is made private: what the gateway detects live
    does not depend on what it stores."""
    import asyncio
    import threading

    from sqlalchemy import select

    from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
    from distillguard.guard.schema import LedgerRow

    class Recorder:  # a Monitor (gateway.Monitor): records what it is given
        def __init__(self):
            self.records, self.seen = [], threading.Event()

        def observe(self, record):
            self.records.append(record)
            self.seen.set()

    monitor = Recorder()
    guard = Guard(
        GuardConfig(db=str(tmp_path / "ledger.db"), ledger_content="hashes", watermark=False),
        monitor=monitor,
    )

    async def main():
        await guard.start()
        try:
            key, _ = await asyncio.to_thread(guard.keys.create, "acct")
            log = RequestLog(client_ip="127.0.0.1", key=key)
            log.set_body(
                json.dumps(
                    {"model": "m", "messages": [{"role": "user", "content": "the question"}]}
                ).encode()
            )
            log.add_response(
                {
                    "choices": [{"index": 0, "message": {"content": "the answer"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                }
            )
            await guard.recorder.finish(log)
        finally:
            await guard.close()

    asyncio.run(main())
    assert monitor.seen.is_set()
    assert monitor.records[0]["request"]["messages"][0]["content"] == "the question"
    assert monitor.records[0]["response"]["text"] == "the answer"
    with guard.engine.connect() as conn:
        stored = conn.execute(select(LedgerRow.request_body, LedgerRow.response_text)).one()
    assert (
        stored.request_body["messages"][0]["content"]["sha256"]
        == hashlib.sha256(b"the question").hexdigest()
    )
    assert json.loads(stored.response_text) == digest("the answer", "hashes")
