"""The request pipeline (``distillguard.pipeline``) in process: the gateway app over the tiny model,
driven through ``httpx.ASGITransport`` with its lifespan run, where a server process is not the
point (tests/guard and tests/serve run real servers).

Each stage-order test sends a request that two stages would refuse differently: the answer
says which ran first. The exits are checked by what they leave behind: a ledger row for every
authenticated request, whichever way it ended, and a settled lease (a key allowed one request
at a time gets through again).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import select

from distillguard.app import create_app
from distillguard.guard.gateway import Guard, GuardConfig
from distillguard.guard.limits import Limits
from distillguard.guard.policy import PolicyConfig
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model
from distillguard.pipeline import (
    Admit,
    Authenticate,
    Countermeasure,
    Generate,
    Idempotency,
    IdempotencyKeyShape,
    Ledger,
    LedgerUp,
    Pipeline,
    Police,
    ReadRequest,
    Settle,
)
from distillguard.serve.backend import Capability
from distillguard.serve.config import ServeConfig
from distillguard.serve.local import LocalBackend

HI = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model("tiny", device="cpu")


@asynccontextmanager
async def gateway(
    tmp_path,
    tiny_lm,
    *,
    guarded: bool = True,
    policy: PolicyConfig | None = None,
    backend_class: type[LocalBackend] = LocalBackend,
):
    """(client, guard or None) of the gateway app, its lifespan running (guard and backend
    started, closed after)."""
    config = ServeConfig(model="tiny", max_body_bytes=4096)
    backend = backend_class(tiny_lm, config)
    guard = None
    if guarded:
        guard = Guard(
            GuardConfig(
                db=f"sqlite:///{tmp_path / 'ledger.db'}",
                watermark_secret="pipeline-test-secret",
                admin_key="admin-secret",
            ),
            policy=policy,
        )
    app = create_app(backend, config, guard)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, guard


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def ledger_rows(guard: Guard) -> list:
    with guard.engine.connect() as conn:
        return list(conn.execute(select(LedgerRow).order_by(LedgerRow.ts)))


def run(coro):
    return asyncio.run(coro)


def test_the_guarded_pipeline_runs_its_stages_and_exits_in_the_documented_order(tmp_path, tiny_lm):
    async def main():
        async with gateway(tmp_path, tiny_lm) as (_, guard):
            backend = LocalBackend(tiny_lm, ServeConfig(model="tiny"))
            return Pipeline.guarded(guard, backend), Pipeline.unguarded(backend)

    guarded, unguarded = run(main())
    assert [type(s) for s in guarded.stages] == [
        LedgerUp,
        Authenticate,
        ReadRequest,
        Police,
        Idempotency,
        Admit,
        Countermeasure,
        Generate,
    ]
    assert [type(e) for e in guarded.exits] == [Settle, Ledger]
    assert [type(s) for s in unguarded.stages] == [ReadRequest, IdempotencyKeyShape, Generate]
    assert unguarded.exits == ()


def test_authentication_runs_before_the_body_is_read(tmp_path, tiny_lm):
    """No key and a body that is not JSON: 401, not 400 (an unauthenticated flood costs no
    parsing and leaves no ledger row)."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            resp = await client.post("/v1/chat/completions", content=b"{not json")
            return resp, ledger_rows(guard)

    resp, rows = run(main())
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "missing_api_key"
    assert rows == []


def test_policing_runs_before_idempotency_and_admission(tmp_path, tiny_lm):
    """A model outside the key's allowlist with an Idempotency-Key its account already used: 404
    from policing, never the stored answer (Idempotency-Keys are per account)."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, open_key = guard.keys.create("acct")
            _, narrow_key = guard.keys.create("acct", models=["other-model"])
            first = await client.post(
                "/v1/chat/completions",
                json=HI,
                headers={**bearer(open_key), "Idempotency-Key": "k1"},
            )
            again = await client.post(
                "/v1/chat/completions",
                json=HI,
                headers={**bearer(open_key), "Idempotency-Key": "k1"},
            )
            narrow = await client.post(
                "/v1/chat/completions",
                json=HI,
                headers={**bearer(narrow_key), "Idempotency-Key": "k1"},
            )
            return first, again, narrow

    first, again, narrow = run(main())
    assert first.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert narrow.status_code == 404
    assert narrow.json()["error"]["code"] == "model_not_found"
    assert "Idempotent-Replayed" not in narrow.headers


def test_the_model_list_is_behind_a_key_and_shows_only_the_keys_models(tmp_path, tiny_lm):
    """GET /v1/models as OpenAI's: 401 without a key; a key restricted to other models sees none
    of the served ones; without the guard, every model."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, open_key = guard.keys.create("acct")
            _, narrow_key = guard.keys.create("acct", models=["other-model"])
            anonymous = await client.get("/v1/models")
            wide = await client.get("/v1/models", headers=bearer(open_key))
            narrow = await client.get("/v1/models", headers=bearer(narrow_key))
        async with gateway(tmp_path, tiny_lm, guarded=False) as (client, _):
            unguarded = await client.get("/v1/models")
        return anonymous, wide, narrow, unguarded

    anonymous, wide, narrow, unguarded = run(main())
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    assert [m["id"] for m in wide.json()["data"]] == ["tiny"]
    assert narrow.status_code == 200 and narrow.json()["data"] == []
    assert [m["id"] for m in unguarded.json()["data"]] == ["tiny"]


def test_a_seed_outside_64_bits_is_refused_naming_the_field(tmp_path, tiny_lm):
    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, key = guard.keys.create("acct")
            big = await client.post(
                "/v1/chat/completions", json={**HI, "seed": 2**63}, headers=bearer(key)
            )
            edge = await client.post(
                "/v1/chat/completions", json={**HI, "seed": 2**63 - 1}, headers=bearer(key)
            )
        return big, edge

    big, edge = run(main())
    assert big.status_code == 400
    assert big.json()["error"]["param"] == "seed"
    assert edge.status_code == 200


def test_a_stored_idempotent_answer_expires_and_is_purged(tmp_path, tiny_lm):
    """Within idempotency_ttl_s (24 h) a key replays its answer and refuses another body; past
    it the key is free again (a new body is answered, not 409) and purge() deletes old answers."""
    from distillguard.guard.schema import IdempotentResponse

    table = IdempotentResponse.__table__
    other = {**HI, "messages": [{"role": "user", "content": "another question"}]}

    def age(guard: Guard, seconds: float) -> None:
        with guard.engine.begin() as conn:
            conn.execute(table.update().values(created_at=table.c.created_at - seconds))

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, key = guard.keys.create("acct")
            headers = {**bearer(key), "Idempotency-Key": "k1"}
            first = await client.post("/v1/chat/completions", json=HI, headers=headers)
            reused = await client.post("/v1/chat/completions", json=other, headers=headers)
            age(guard, guard.config.idempotency_ttl_s + 1)
            fresh = await client.post("/v1/chat/completions", json=other, headers=headers)
            replay = await client.post("/v1/chat/completions", json=other, headers=headers)
            await client.post(
                "/v1/chat/completions", json=HI, headers={**bearer(key), "Idempotency-Key": "k2"}
            )
            age(guard, guard.config.idempotency_ttl_s + 1)
            purged = guard.claims.purge()
            with guard.engine.connect() as conn:
                left = conn.execute(select(table.c.key)).all()
        return first, reused, fresh, replay, purged, left

    first, reused, fresh, replay, purged, left = run(main())
    assert first.status_code == 200
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json() == fresh.json()
    assert purged == 2 and left == []


@pytest.mark.parametrize("key", ["", "k" * 129])
def test_a_malformed_idempotency_key_is_refused_with_and_without_the_guard(tmp_path, tiny_lm, key):
    """One rule for both: ``--no-guard`` keeps no claims, yet an empty or over-long key is a 400
    naming the header, as behind the guard (a well-formed key is answered, never replayed)."""

    async def main(guarded):
        async with gateway(tmp_path / str(guarded), tiny_lm, guarded=guarded) as (client, guard):
            headers = {}
            if guard is not None:
                _, secret = guard.keys.create("acct")
                headers = bearer(secret)
            bad = await client.post(
                "/v1/chat/completions", json=HI, headers={**headers, "Idempotency-Key": key}
            )
            good = [
                await client.post(
                    "/v1/chat/completions", json=HI, headers={**headers, "Idempotency-Key": "k1"}
                )
                for _ in range(2)
            ]
            return bad, good

    for guarded in (False, True):
        bad, good = run(main(guarded))
        assert bad.status_code == 400, (guarded, bad.text)
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"]) == ("Idempotency-Key", "invalid_value")
        assert str(len(key)) in error["message"]
        assert [g.status_code for g in good] == [200, 200]
        replayed = [g.headers.get("Idempotent-Replayed") for g in good]
        assert replayed == ([None, "true"] if guarded else [None, None])


class _NoCountermeasures(LocalBackend):
    """The tiny model served by a backend that can apply no countermeasure (as a plain
    OpenAI-compatible upstream cannot)."""

    capabilities = frozenset()


class _OldFlags(LocalBackend):
    """A backend written before ``capabilities``: it declares the old per-countermeasure flags
    (``capabilities = None`` hides LocalBackend's own)."""

    capabilities = None
    supports_watermark = True
    supports_antidistill = False


ANTIDISTILLED = PolicyConfig(ladder={"suspect": ["log", "antidistill"]})


def _countermeasure_run(tmp_path, tiny_lm, backend_class):
    """A suspect account's request under a ladder that asks for antidistillation, the account's
    watermark on: (its ledger row, the unavailable-countermeasure counts in /metrics)."""

    async def main():
        async with gateway(
            tmp_path, tiny_lm, policy=ANTIDISTILLED, backend_class=backend_class
        ) as (client, guard):
            _, secret = guard.keys.create("acct")
            await asyncio.to_thread(guard.policing.record, "acct", "suspect")
            resp = await client.post("/v1/chat/completions", json=HI, headers=bearer(secret))
            assert resp.status_code == 200, resp.text
            metrics = (await client.get("/metrics", headers=bearer("admin-secret"))).text
            return ledger_rows(guard)[0], metrics

    row, metrics = run(main())
    unavailable = {
        c.value: f'distillguard_countermeasures_unavailable_total{{countermeasure="{c.value}"}} 1.0'
        in metrics
        for c in Capability
    }
    return row, unavailable


def test_the_pipeline_applies_only_what_the_backend_can_and_counts_what_it_drops(tmp_path, tiny_lm):
    """The tiny model without an antidistillation direction: watermarked (the row has the
    account's key id), antidistillation dropped (not in policy_action) and counted. A backend
    with no capabilities: neither applied, both counted."""
    row, unavailable = _countermeasure_run(tmp_path / "local", tiny_lm, LocalBackend)
    assert row.watermark_key_id is not None
    assert row.policy_action == "suspect:log"
    assert unavailable == {"watermark": False, "antidistill": True}

    row, unavailable = _countermeasure_run(tmp_path / "none", tiny_lm, _NoCountermeasures)
    assert row.watermark_key_id is None
    assert row.policy_action == "suspect:log"
    assert unavailable == {"watermark": True, "antidistill": True}


def test_a_backend_on_the_old_supports_flags_still_works_for_one_release_with_a_warning(
    tmp_path, tiny_lm
):
    """Its supports_watermark = True keeps its answers watermarked (dropping it silently would
    unwatermark a third-party backend's answers); the warning, at start, says what to declare."""
    with pytest.warns(DeprecationWarning, match="supports_antidistill, supports_watermark"):
        row, unavailable = _countermeasure_run(tmp_path, tiny_lm, _OldFlags)
    assert row.watermark_key_id is not None
    assert unavailable == {"watermark": False, "antidistill": True}


def test_a_blocked_account_is_refused_before_anything_is_reserved(tmp_path, tiny_lm):
    """A blocked account whose key allows one request at a time sends two: both 403 (a 429
    would mean the first one's reservation leaked), each with a ledger row."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, secret = guard.keys.create("bad", limits=Limits(max_concurrent=1, rpm=1))
            await asyncio.to_thread(guard.policing.record, "bad", "blocked")
            answers = [
                await client.post("/v1/chat/completions", json=HI, headers=bearer(secret))
                for _ in range(2)
            ]
            return answers, ledger_rows(guard)

    answers, rows = run(main())
    assert [a.status_code for a in answers] == [403, 403]
    assert {a.json()["error"]["code"] for a in answers} == {"account_blocked"}
    assert [(r.status, r.error_code, r.policy_action) for r in rows] == [
        (403, "account_blocked", "blocked:block")
    ] * 2


def test_every_way_out_settles_the_lease_and_writes_the_row(tmp_path, tiny_lm):
    """One request in flight per key: a 200, a 400 from the backend (after admission), a stream
    and another 200 in turn all get through, so each settled its lease; each has its row."""
    too_long = {**HI, "max_tokens": 10**6}

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            _, secret = guard.keys.create("acct", limits=Limits(max_concurrent=1))
            answers = [
                await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
                for body in (HI, too_long, {**HI, "stream": True}, HI)
            ]
            return answers, ledger_rows(guard)

    answers, rows = run(main())
    assert [a.status_code for a in answers] == [200, 400, 200, 200]
    assert answers[1].json()["error"]["param"] == "max_tokens"
    assert answers[2].text.rstrip().endswith("data: [DONE]")
    assert [(r.status, r.stream) for r in rows] == [
        (200, False),
        (400, False),
        (200, True),
        (200, False),
    ]
    assert all(r.completion_tokens for r in rows if r.status == 200)


def test_a_canary_answers_in_place_of_the_backend_and_is_recorded(tmp_path, tiny_lm):
    policy = PolicyConfig(ladder={"suspect": ["log", "canary"]}, canary_rate=1.0)

    async def main():
        async with gateway(tmp_path, tiny_lm, policy=policy) as (client, guard):
            _, secret = guard.keys.create("acct")
            await asyncio.to_thread(guard.policing.record, "acct", "suspect")
            whole = await client.post("/v1/chat/completions", json=HI, headers=bearer(secret))
            streamed = await client.post(
                "/v1/chat/completions", json={**HI, "stream": True}, headers=bearer(secret)
            )
            return whole, streamed, ledger_rows(guard)

    whole, streamed, rows = run(main())
    text = whole.json()["choices"][0]["message"]["content"]
    assert text.startswith("The ") and " is best known for " in text
    events = [
        json.loads(line[len("data: ") :])
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert " is best known for " in "".join(
        c["delta"].get("content") or "" for e in events for c in e["choices"]
    )
    assert [(r.policy_action, r.response_text) for r in rows][0] == ("suspect:log,canary", text)
    assert rows[1].policy_action == "suspect:log,canary"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"content": b"{not json"}, 400, "invalid_json"),
        ({"json": {**HI, "tools": []}}, 400, "unsupported_parameter"),
        ({"json": {**HI, "frobnicate": 1}}, 400, "unknown_parameter"),
        ({"json": {"model": "tiny"}}, 400, "missing_required_parameter"),
        ({"content": b"x" * 5000}, 413, "request_too_large"),  # over max_body_bytes
    ],
)
def test_bad_requests_get_openai_error_shapes_with_and_without_the_guard(
    tmp_path, tiny_lm, request_kwargs, status, code
):
    async def main(guarded):
        async with gateway(tmp_path / str(guarded), tiny_lm, guarded=guarded) as (client, guard):
            headers = {}
            if guard is not None:
                _, secret = guard.keys.create("acct")
                headers = bearer(secret)
            return await client.post("/v1/chat/completions", headers=headers, **request_kwargs)

    for guarded in (True, False):
        resp = run(main(guarded))
        assert resp.status_code == status, (guarded, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code


def test_admin_routes_and_metrics_exist_only_with_the_guard(tmp_path, tiny_lm):
    async def main(guarded):
        async with gateway(tmp_path / str(guarded), tiny_lm, guarded=guarded) as (client, _):
            admin = bearer("admin-secret")
            return (
                await client.get("/metrics", headers=admin),
                await client.get("/admin/keys", headers=admin),
                await client.get("/healthz"),
            )

    metrics, keys, health = run(main(True))
    assert metrics.status_code == 200 and "distillguard" in metrics.text
    # the ledger writer's health, for an operator's alert before users see 503s
    assert "distillguard_ledger_up 1.0" in metrics.text
    assert "distillguard_ledger_rows_refused_total 0.0" in metrics.text
    assert keys.status_code == 200 and keys.json()["object"] == "list"
    assert health.json() == {"status": "ok"}
    metrics, keys, health = run(main(False))
    assert (metrics.status_code, keys.status_code) == (404, 404)
    assert metrics.json()["error"]["code"] == "not_found"
    assert health.json() == {"status": "ok"}


def test_metrics_show_a_stopped_ledger_writer_before_users_do(tmp_path, tiny_lm):
    """/metrics' distillguard_ledger_up goes 1 -> 0 when the writer thread stops (the gateway
    then answers 503 ledger_unavailable), and the rows it committed are counted."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard):
            admin = bearer("admin-secret")
            _, key = guard.keys.create("acct")
            await client.post("/v1/chat/completions", json=HI, headers=bearer(key))
            before = (await client.get("/metrics", headers=admin)).text
            guard.ledger._queue.put(None)  # what close() sends: the writer stops
            await asyncio.to_thread(guard.ledger._thread.join, 10)
            after = (await client.get("/metrics", headers=admin)).text
            refused = await client.post("/v1/chat/completions", json=HI, headers=bearer(key))
            return before, after, refused

    before, after, refused = run(main())
    assert "distillguard_ledger_up 1.0" in before
    assert "distillguard_ledger_rows_written_total 1.0" in before
    assert "distillguard_ledger_up 0.0" in after
    assert refused.status_code == 503


def test_a_bad_admin_body_is_worded_as_the_chat_routes_word_it(tmp_path, tiny_lm):
    """The admin API reports a bad body through the serve layer's converter (passed in by the
    app, so guard does not import serve)."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, _):
            return await client.post(
                "/admin/keys", json={"account": "a", "rpm": 0}, headers=bearer("admin-secret")
            )

    resp = run(main())
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "rpm"
    assert resp.json()["error"]["code"] == "invalid_value"


def test_serve_and_guard_do_not_import_each_other():
    """Only the layer above (the pipeline, the app) joins them. grimp reads every import
    statement, lazy ones inside functions included; TYPE_CHECKING imports never run."""
    import grimp

    # no cache: a cached file keeps the imports it was read with, even of a package added since
    graph = grimp.build_graph("distillguard", exclude_type_checking_imports=True, cache_dir=None)

    def imports(a: str, b: str) -> list[tuple[str, str]]:
        return [
            (m, i)
            for m in graph.modules
            if m.startswith(f"distillguard.{a}.")
            for i in graph.find_modules_directly_imported_by(m)
            if i == f"distillguard.{b}" or i.startswith(f"distillguard.{b}.")
        ]

    assert len([m for m in graph.modules if m.startswith("distillguard.serve.")]) > 5
    assert imports("serve", "guard") == []
    assert imports("guard", "serve") == []
    above = graph.find_modules_directly_imported_by("distillguard.pipeline")
    assert {"distillguard.serve.app", "distillguard.guard.requestlog"} <= above
