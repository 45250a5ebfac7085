"""Bad requests, sent as raw bytes: each gets the right status and an OpenAI-shaped error, never a 500."""

from __future__ import annotations

import json

import httpx
import pytest

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
MiB = 1024 * 1024


def body(**changes) -> bytes:
    """GOOD with fields changed (a value of ``...`` removes the field), as JSON bytes."""
    out = {**GOOD, **changes}
    return json.dumps({k: v for k, v in out.items() if v is not ...}).encode()


# (id, method, path, raw body, status, param, code)
CASES = [
    ("unknown field", "POST", "/v1/chat/completions", body(foo=1), 400, "foo", "unknown_parameter"),
    (
        "unknown nested field",
        "POST",
        "/v1/chat/completions",
        body(messages=[{"role": "user", "content": "x", "mood": "happy"}]),
        400,
        "messages[0].mood",
        "unknown_parameter",
    ),
    (
        "unsupported OpenAI parameter",
        "POST",
        "/v1/chat/completions",
        body(tools=[]),
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "missing model",
        "POST",
        "/v1/chat/completions",
        body(model=...),
        400,
        "model",
        "missing_required_parameter",
    ),
    (
        "missing messages",
        "POST",
        "/v1/chat/completions",
        body(messages=...),
        400,
        "messages",
        "missing_required_parameter",
    ),
    (
        "temperature as a string",
        "POST",
        "/v1/chat/completions",
        body(temperature="1"),
        400,
        "temperature",
        "invalid_type",
    ),
    (
        "stream as a number",
        "POST",
        "/v1/chat/completions",
        body(stream=1),
        400,
        "stream",
        "invalid_type",
    ),
    (
        "max_tokens as a float",
        "POST",
        "/v1/chat/completions",
        body(max_tokens=2.5),
        400,
        "max_tokens",
        "invalid_type",
    ),
    (
        "messages not a list",
        "POST",
        "/v1/chat/completions",
        body(messages="Hello"),
        400,
        "messages",
        "invalid_type",
    ),
    (
        "content a number",
        "POST",
        "/v1/chat/completions",
        body(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        "invalid_type",
    ),
    (
        "temperature 3",
        "POST",
        "/v1/chat/completions",
        body(temperature=3),
        400,
        "temperature",
        "invalid_value",
    ),
    ("top_p 1.5", "POST", "/v1/chat/completions", body(top_p=1.5), 400, "top_p", "invalid_value"),
    ("n 0", "POST", "/v1/chat/completions", body(n=0), 400, "n", "invalid_value"),
    ("n 17", "POST", "/v1/chat/completions", body(n=17), 400, "n", "invalid_value"),
    (
        "top_logprobs 21",
        "POST",
        "/v1/chat/completions",
        body(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "max_tokens 0",
        "POST",
        "/v1/chat/completions",
        body(max_tokens=0),
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_completion_tokens -1",
        "POST",
        "/v1/chat/completions",
        body(max_completion_tokens=-1),
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    (
        "presence_penalty 2.5",
        "POST",
        "/v1/chat/completions",
        body(presence_penalty=2.5),
        400,
        "presence_penalty",
        "invalid_value",
    ),
    (
        "five stop strings",
        "POST",
        "/v1/chat/completions",
        body(stop=["a", "b", "c", "d", "e"]),
        400,
        "stop",
        "invalid_value",
    ),
    (
        "empty stop string in a list",
        "POST",
        "/v1/chat/completions",
        body(stop=["a", ""]),
        400,
        "stop",
        "invalid_value",
    ),
    (
        "empty messages",
        "POST",
        "/v1/chat/completions",
        body(messages=[]),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        body(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages[0].role",
        "invalid_type",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        "/v1/chat/completions",
        body(top_logprobs=2),
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "stream_options without stream",
        "POST",
        "/v1/chat/completions",
        body(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "invalid_value",
    ),
    (
        "max_tokens and max_completion_tokens disagree",
        "POST",
        "/v1/chat/completions",
        body(max_tokens=3, max_completion_tokens=4),
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "logit_bias key not a token id",
        "POST",
        "/v1/chat/completions",
        body(logit_bias={"hello": 1}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "logit_bias token outside the vocabulary",
        "POST",
        "/v1/chat/completions",
        body(logit_bias={"259": 1}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        body(model="gpt-9"),
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown model, streaming",
        "POST",
        "/v1/chat/completions",
        body(model="gpt-9", stream=True),
        404,
        "model",
        "model_not_found",
    ),
    (
        "body over the size limit",
        "POST",
        "/v1/chat/completions",
        b" " * (5 * MiB),
        413,
        None,
        "request_too_large",
    ),
    (
        "invalid JSON",
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny",',
        400,
        None,
        "invalid_json",
    ),
    (
        "invalid UTF-8",
        "POST",
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        "invalid_json",
    ),
    ("JSON array", "POST", "/v1/chat/completions", b"[]", 400, None, "invalid_json"),
    ("JSON string", "POST", "/v1/chat/completions", b'"hello"', 400, None, "invalid_json"),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, None, "invalid_json"),
    # The tiny model has one token per byte and a 512-token context.
    (
        "prompt over the context",
        "POST",
        "/v1/chat/completions",
        body(messages=[{"role": "user", "content": "x" * 600}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "prompt over the context, streaming",
        "POST",
        "/v1/chat/completions",
        body(messages=[{"role": "user", "content": "x" * 600}], stream=True),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "max_tokens past the context",
        "POST",
        "/v1/chat/completions",
        body(max_tokens=500),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("unknown route", "POST", "/v1/completions/nope", body(), 404, None, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None, "method_not_allowed"),
]


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server, timeout=60) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "param", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request(http, method, path, raw, status, param, code):
    resp = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    payload = resp.json()
    assert list(payload) == ["error"]
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code


def test_chunked_body_over_the_limit(http):
    # No Content-Length: the limit is enforced while the body is read.
    def chunks():
        for _ in range(5):
            yield b" " * MiB

    resp = http.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_body_just_under_the_limit_is_read(http):
    # 3.9 MiB of whitespace around a valid request: parsed (then refused for its context, not its size).
    padded = b" " * int(3.9 * MiB) + body(messages=[{"role": "user", "content": "x" * 600}])
    resp = http.post(
        "/v1/chat/completions", content=padded, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_server_still_answers_after_bad_requests(http):
    resp = http.post("/v1/chat/completions", content=body())
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"
    assert http.get("/healthz").json() == {"status": "ok"}
