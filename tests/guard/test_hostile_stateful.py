"""A stateful hostile client (hypothesis ``RuleBasedStateMachine``) against a live gateway.

Each run is one account with three keys (no limits; ``rpm`` 5; ``max_concurrent`` 1) and mixes
normal requests, streams that hang up after k events, non-streaming clients that disconnect,
idempotent retries (sequential and concurrent, one key), admin calls (create and revoke keys,
verdicts) and bursts of hostile bodies. After every step: no 5xx and no hang (each rule checks its
own answers), ``/healthz`` is 200, and the ledger holds exactly one row per chat request answered
with a valid key. At the end of a run: no 60 s window held more than ``rpm`` admitted requests of
the limited key, and nothing holds a concurrency lease (the ``max_concurrent 1`` key is served).
The slow part sends at least 400 requests (with ``test_fuzz.py``'s slow part: over 20,000).
"""

from __future__ import annotations

import itertools
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, func, select

from distillguard.guard.schema import LedgerRow
from tests.guard.hostile import (
    BASE,
    CHAT,
    TIMEOUT_S,
    Probe,
    Request,
    check_answer,
    encode,
    extra_headers,
    has_row,
    mutated_body,
    raw_body,
    valid_request,
)
from tests.servers import server_process

ADMIN = "admin-" + uuid.uuid4().hex
RPM = 5
SETTLE_S = 15.0  # how long an abandoned request may take to reach the ledger and free its lease
_runs = itertools.count()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    path = tmp_path_factory.mktemp("stateful") / "ledger.db"
    with server_process(
        "--model", "tiny", "--db", f"sqlite:///{path}", env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as server:
        probe = Probe(server.url)
        yield server.url, probe, create_engine(f"sqlite:///{path}")
        probe.close()


def eventually(check, what: str, within: float = SETTLE_S):
    """``check()`` until it is truthy; fail naming ``what`` after ``within`` seconds. For effects
    that are asynchronous by design (an abandoned request's row, an expired stream's lease)."""
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {within:.0f} s")
        time.sleep(0.05)
    return result


class HostileClient(RuleBasedStateMachine):
    url: str
    probe: Probe
    engine = None

    @initialize()
    def setup(self):
        self.account = f"st-{next(_runs)}-{uuid.uuid4().hex[:6]}"
        self.admin = {"Authorization": f"Bearer {ADMIN}"}
        self.keys = {
            name: self.create_key(**limits)
            for name, limits in (
                ("open", {}),
                ("limited", {"rpm": RPM}),
                ("single", {"max_concurrent": 1}),
            )
        }
        self.revoked: list[str] = []
        self.answered = (
            0  # chat requests answered with a valid key of this account: one ledger row each
        )
        self.admitted: list[
            tuple[float, float]
        ] = []  # (sent, answered) of the limited key's fresh 200s

    # ---- helpers -----------------------------------------------------------------------------
    def create_key(self, **limits) -> str:
        resp = self.probe.client.post(
            "/admin/keys", headers=self.admin, json={"account": self.account, **limits}
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["key"]

    def auth(self, name: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def chat(
        self, name: str, body: dict | bytes, family: str, headers: dict | None = None
    ) -> httpx.Response:
        started = time.monotonic()
        content = body if isinstance(body, bytes) else encode(body)
        resp = self.probe.send(
            Request("POST", CHAT, {**self.auth(name), **(headers or {})}, content, self.account),
            family,
        )
        if has_row(resp.status_code):
            self.answered += 1
        if (
            name == "limited"
            and resp.status_code == 200
            and resp.headers.get("Idempotent-Replayed") != "true"
        ):
            self.admitted.append(
                (started, time.monotonic())
            )  # a fresh answer: admitted by the limiter
        if name == "open":
            assert resp.status_code != 429, (
                resp.text
            )  # no limit on this key, and no lease left behind
        return resp

    def ledger_rows(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(LedgerRow)
                .where(LedgerRow.account_id == self.account)
            ).scalar()

    # ---- rules -------------------------------------------------------------------------------
    @rule(
        key=st.sampled_from(["open", "limited", "single"]),
        stream=st.booleans(),
        n=st.integers(1, 2),
    )
    def normal_request(self, key, stream, n):
        resp = self.chat(key, {**BASE, "stream": stream, "n": n}, "normal")
        assert resp.status_code in ((200,) if key == "open" else (200, 429)), resp.text

    @rule(
        key=st.sampled_from(["open", "single"]), k=st.integers(0, 4), max_tokens=st.integers(4, 8)
    )
    def aborted_stream(self, key, k, max_tokens):
        """A stream whose client hangs up after ``k`` events."""
        body = encode({**BASE, "stream": True, "max_tokens": max_tokens})
        with httpx.Client(base_url=self.url, timeout=TIMEOUT_S) as client:
            with client.stream("POST", CHAT, headers=self.auth(key), content=body) as resp:
                if resp.status_code != 200:
                    text = resp.read()
                    check_answer(resp, text, Request("POST", CHAT, {}, body))
                else:
                    events = 0
                    for line in resp.iter_lines():
                        events += line.startswith("data: ")
                        if events >= k:
                            break
        self.probe.sent["aborted_stream"] += 1
        self.answered += 1

    @rule(key=st.sampled_from(["open", "single"]), wait_ms=st.sampled_from([0, 5, 50]))
    def disconnect_before_answer(self, key, wait_ms):
        """A non-streaming client that sends its whole request, then closes before the answer."""
        body = encode({**BASE, "max_tokens": 16})
        parts = urlsplit(self.url)
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.keys[key]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(head + body)
            time.sleep(wait_ms / 1000)
        self.probe.sent["disconnect"] += 1
        self.answered += 1

    @rule(concurrent=st.integers(1, 4), stream=st.just(False))
    def idempotent_retries(self, concurrent, stream):
        """A request and its retries with one Idempotency-Key: at most one generation, every
        answer the first one's (a replay) or a 409 while it is in flight; never a 5xx."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {**BASE, "seed": 7}
        with ThreadPoolExecutor(concurrent) as pool:
            first = list(
                pool.map(
                    lambda _: self.chat("open", body, "idempotent", headers), range(concurrent)
                )
            )
        retry = self.chat("open", body, "idempotent", headers)
        answers = first + [retry]
        assert {r.status_code for r in answers} <= {200, 409}, [
            (r.status_code, r.text[:200]) for r in answers
        ]
        assert retry.status_code == 200, retry.text
        ids = {r.json()["id"] for r in answers if r.status_code == 200}
        assert len(ids) == 1, ids  # one generation, replayed
        assert retry.headers.get("Idempotent-Replayed") == "true"

    @rule(
        limits=st.fixed_dictionaries(
            {},
            optional={
                "rpm": st.integers(1, 100),
                "tpm": st.integers(1, 10**6),
                "max_concurrent": st.integers(1, 8),
                "daily_tokens": st.integers(1, 10**9),
            },
        )
    )
    def admin_create_key(self, limits):
        name = f"extra{len(self.keys)}"
        self.keys[name] = self.create_key(**limits)
        resp = self.chat(name, BASE, "admin")
        assert resp.status_code in (200, 400, 429), (
            resp.text
        )  # 400: a tpm below this request's reservation

    @precondition(lambda self: any(k.startswith("extra") for k in self.keys))
    @rule(data=st.data())
    def admin_revoke_key(self, data):
        name = data.draw(st.sampled_from(sorted(k for k in self.keys if k.startswith("extra"))))
        listed = self.probe.client.get(
            "/admin/keys", params={"account": self.account}, headers=self.admin
        ).json()["data"]
        secret = self.keys.pop(name)
        key_id = next(k["id"] for k in listed if secret.startswith(k["prefix"]) and k["active"])
        resp = self.probe.client.delete(f"/admin/keys/{key_id}", headers=self.admin)
        assert resp.status_code == 200, resp.text
        gone = self.probe.send(
            Request("POST", CHAT, {"Authorization": f"Bearer {secret}"}, encode(BASE)), "admin"
        )
        assert gone.status_code == 401, gone.text  # revoked through this replica: at once, no row

    @rule(
        level=st.sampled_from(["ok", "watch", "throttle"]),
        score=st.floats(allow_nan=False, allow_infinity=False),
    )
    def admin_verdict(self, level, score):
        resp = self.probe.client.post(
            f"/admin/accounts/{self.account}/verdict",
            headers=self.admin,
            json={"level": level, "score": score},
        )
        check_answer(resp, resp.content, Request("POST", "/admin/verdict", {}, b""))
        assert resp.status_code in (201, 400), resp.text
        listed = self.probe.client.get(
            "/admin/verdicts", params={"account": self.account}, headers=self.admin
        )
        assert listed.status_code == 200, listed.text

    @rule(bodies=st.lists(mutated_body() | raw_body, min_size=1, max_size=20))
    def hostile_burst(self, bodies):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda b: self.chat("open", b, "hostile"), bodies))

    @rule(
        requests=st.lists(
            st.tuples(
                st.sampled_from(["open", "single", "limited"]),
                valid_request.map(encode),
                extra_headers(),
            ),
            min_size=1,
            max_size=10,
        )
    )
    def odd_headers_burst(self, requests):
        """Valid bodies on every key with odd headers (Content-Types, Idempotency-Keys, forwarding,
        huge or many headers): limits and leases hold whatever the headers say."""
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: self.chat(r[0], r[1], "headers", r[2]), requests))
        assert all(resp.status_code < 500 for resp in answers)

    # ---- invariants after every step ---------------------------------------------------------
    @invariant()
    def healthy(self):
        assert self.probe.client.get("/healthz").status_code == 200

    @invariant()
    def every_answer_has_its_row(self):
        if not hasattr(self, "account"):
            return
        # Abandoned requests are written without waiting (their client is gone): allow them time.
        eventually(
            lambda: self.ledger_rows() == self.answered,
            f"{self.account}: {self.answered} requests answered, ledger rows {self.ledger_rows()}",
        )

    def teardown(self):
        if not hasattr(self, "account"):
            return
        self.admitted.sort()
        for i in range(len(self.admitted) - RPM):
            group = self.admitted[i : i + RPM + 1]
            # Admission happened between sending and the answer: if even the widest reading of
            # these RPM + 1 admissions fits in 60 s, the limit was exceeded.
            assert max(end for _, end in group) - group[0][0] >= 60, (
                f"over {RPM} admitted in 60 s: {group}"
            )

        def single_key_served():
            resp = self.probe.client.post(CHAT, headers=self.auth("single"), content=encode(BASE))
            assert resp.status_code in (200, 429), resp.text
            if resp.status_code == 200:
                self.answered += 1
            return resp.status_code == 200

        eventually(single_key_served, "a max_concurrent=1 key is refused: a lease leaked")
        usage = self.probe.client.get(
            f"/admin/accounts/{self.account}/usage", headers=self.admin
        ).json()
        assert all(k["live"]["in_flight"] == 0 for k in usage["keys"]), usage


@pytest.mark.parametrize(
    "runs,steps,least",
    [
        pytest.param(6, 10, 60, id="fast"),
        pytest.param(40, 25, 400, id="slow", marks=pytest.mark.slow),  # ~1,000 sent; 364 at 15 x 20
    ],
)
def test_hostile_client_state_machine(gateway, runs, steps, least):
    url, probe, engine = gateway
    HostileClient.url, HostileClient.probe, HostileClient.engine = url, probe, engine
    before = sum(probe.sent.values())
    run_state_machine_as_test(
        HostileClient,
        settings=settings(
            max_examples=runs,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    sent = sum(probe.sent.values()) - before
    assert sent >= least, (sent, probe.sent)  # the hostile requests claimed are the ones sent
    print(f"stateful: {sent} requests {dict(probe.sent)}; statuses {dict(probe.statuses)}")
