"""``distillguard serve --upstream URL``: a gateway proxying to another OpenAI-compatible server.

The upstream is the real tiny server; only the misbehaving upstream is a stand-in: a small
HTTP server that answers too late (slow), then is stopped (down: connection refused).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]
SLOW_S = 3.0  # how long the slow upstream takes; the gateway gives up after 1 s


@pytest.fixture(scope="module")
def gateway(serve, tiny_server) -> str:
    return serve("--upstream", tiny_server, "--no-guard")


@pytest.fixture(scope="module")
def gateway_client(gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def test_models_come_from_the_upstream(gateway_client):
    assert [m.id for m in gateway_client.models.list()] == ["tiny"]


def test_completion_goes_through(gateway_client, client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=12, seed=3, logprobs=True, top_logprobs=2)
    proxied = gateway_client.chat.completions.create(**kw)
    direct = client.chat.completions.create(**kw)
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage == direct.usage
    assert proxied.choices[0].logprobs.content == direct.choices[0].logprobs.content


def test_stream_goes_through(gateway_client, client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=12, seed=4)
    direct = client.chat.completions.create(**kw)
    chunks = list(
        gateway_client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == direct.choices[0].message.content
    )
    assert chunks[-1].usage == direct.usage
    assert chunks[-2].choices[0].finish_reason == direct.choices[0].finish_reason


def test_stream_without_usage_sends_none(gateway_client):
    chunks = list(
        gateway_client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    assert all(c.choices and c.usage is None for c in chunks)


def test_upstream_4xx_passes_through(gateway):
    for stream in (False, True):
        resp = httpx.post(
            f"{gateway}/v1/chat/completions",
            timeout=30,
            json={"model": "gpt-9", "messages": MESSAGES, "stream": stream},
        )
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "model_not_found"
        assert resp.json()["error"]["param"] == "model"


def test_gateway_validates_before_forwarding(gateway):
    resp = httpx.post(
        f"{gateway}/v1/chat/completions",
        timeout=30,
        json={"model": "tiny", "messages": MESSAGES, "temperature": 5},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "temperature"


def assert_upstream_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"
    assert error["code"] == code


class SlowHandler(BaseHTTPRequestHandler):
    """Reads the request, then waits SLOW_S before answering: an upstream that hangs."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(SLOW_S)
        try:
            payload = b'{"choices": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway gave up on us, as it should

    def log_message(self, *args):
        pass


class SlowUpstream:
    """A slow HTTP server on a fixed loopback port that can be stopped (then the port is closed)."""

    def __init__(self, port: int):
        self.port = port
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.server is None:
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), SlowHandler)
            self.server.daemon_threads = True
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()
            self.server = self.thread = None


@pytest.fixture(scope="module")
def bad_upstream() -> Iterator[SlowUpstream]:
    with socket.socket() as s:  # a free port, kept for the fake so the gateway can point at it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = SlowUpstream(port)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def bad_gateway(serve, bad_upstream) -> str:
    """One gateway in front of the fake: slow while it runs, down once it is stopped."""
    return serve(
        "--upstream",
        f"http://127.0.0.1:{bad_upstream.port}",
        "--upstream-timeout",
        "1",
        "--no-guard",
    )


def test_upstream_timeout_is_504(bad_gateway, bad_upstream):
    bad_upstream.start()
    for stream in (False, True):
        started = time.monotonic()
        resp = httpx.post(
            f"{bad_gateway}/v1/chat/completions",
            timeout=30,
            json={"model": "tiny", "messages": MESSAGES, "stream": stream},
        )
        assert_upstream_error(resp, 504, "upstream_timeout")
        assert time.monotonic() - started < SLOW_S  # it gave up; it did not wait for the answer


def test_upstream_down_is_502(bad_gateway, bad_upstream):
    bad_upstream.stop()  # nothing listens on the port now: connection refused
    for stream in (False, True):
        resp = httpx.post(
            f"{bad_gateway}/v1/chat/completions",
            timeout=30,
            json={"model": "tiny", "messages": MESSAGES, "stream": stream},
        )
        assert_upstream_error(resp, 502, "upstream_unavailable")
