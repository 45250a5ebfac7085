"""Hostile HTTP requests for the gateway fuzzers (``test_fuzz.py``, ``test_hostile_stateful.py``).

Bodies are built as JSON *text*, not Python objects: a hostile client sends what ``json.dumps``
never writes (a lone surrogate as ``\\ud800`` or as the invalid UTF-8 bytes ``ED A0 80``, 10^400,
a 5,000-digit integer, ``1e999``, 10,000 levels of nesting, duplicate keys). :class:`Raw` holds
such text and :func:`encode` places it verbatim.

Valid requests are drawn from the server's own request schema (``ChatCompletionRequest``'s JSON
schema, the one ``/openapi.json`` publishes; :func:`from_schema`), so every field of the OpenAI chat
schema is exercised; mutations then put hostile values in any value or key position.
(hypothesis-jsonschema would do this, but its 0.23 does not run on this hypothesis; the subset of
JSON Schema pydantic writes for this model is small.)

:class:`Probe` sends a request and checks the invariants every answer must keep, whatever was
sent: a status below 500, an answer within :data:`TIMEOUT_S`, OpenAI's error shape on every 4xx,
and a well-framed body on every 2xx (a stream ends with ``[DONE]`` or an error event).
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from hypothesis import strategies as st

from distillguard.serve.schemas import UNSUPPORTED, ChatCompletionRequest

TIMEOUT_S = 30.0  # "no hang": every request is answered within this, or the test fails
CHAT = "/v1/chat/completions"
BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SCHEMA = ChatCompletionRequest.model_json_schema()
FIELDS = sorted(SCHEMA["properties"]) + sorted(UNSUPPORTED)
NUMERIC_FIELDS = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
]


def pick(items: list) -> st.SearchStrategy:
    """``sampled_from(items)`` with a short repr (hypothesis refuses to print megabyte reprs)."""
    return st.integers(0, len(items) - 1).map(lambda i: items[i])


class Raw:
    """JSON text placed verbatim by :func:`encode` (usable as a value or as an object key)."""

    __slots__ = ("text",)

    def __init__(self, text: bytes):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


def encode(value) -> bytes:
    """JSON bytes of ``value``; :class:`Raw` parts verbatim, strings with lone surrogates escaped
    as ``\\udXXX`` (what ``json.dumps`` does with ``ensure_ascii``)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(encode(k) + b":" + encode(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    if isinstance(value, float) and value != value:
        return b"NaN"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**4000:
        raise ValueError("use Raw for integers over 4,000 digits (str(int) refuses them)")
    return json.dumps(value, allow_nan=True).encode()


# ---- strings ---------------------------------------------------------------------------------

# A lone surrogate, a reversed pair, a surrogate next to ASCII, NUL, C1 controls, and digits that
# str.isdigit() accepts: superscripts and circled numbers (int() refuses them), Arabic-Indic,
# fullwidth, N'Ko and mathematical digits (int() reads them).
ODD_CHARS = [
    "\ud800",
    "\udfff",
    "\udc00",
    "\ud83d",
    "\x00",
    "\x01",
    "\x85",
    "\u2028",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "²",
    "³",
    "¹",
    "⑴",
    "①",
    "١",
    "٢",
    "１",
    "߀",
    "𝟘",
    "〇",
    "Ⅻ",
    "e",
    "-",
    " ",
]
odd_text = st.text(alphabet=st.sampled_from(ODD_CHARS) | st.characters(), max_size=12)

RAW_STRINGS = [
    b'"\\ud800"',
    b'"a\\udfffb"',
    b'"\\udc00\\ud800"',
    b'"\\ud800\\u0041"',
    b'"\\ud83d"',  # escaped lone surrogates
    b'"\xed\xa0\x80"',
    b'"a\xed\xbf\xbfb"',  # a surrogate as (invalid) UTF-8
    b'"\xff\xfe"',
    b'"\xc0\x80"',
    b'"\xf4\x90\x80\x80"',
    b'"\xe2\x82"',
    b'"\x80"',  # invalid UTF-8
    b'"\\u0000"',
    b'"\x01\x1f"',
    b'"\\u"',
    b'"\\uZZZZ"',
    b'"\\x41"',
    b'"\\',  # NUL, raw controls, bad escapes
    b'"' + b"9" * 5000 + b'"',
    b'"' + b"0" * 4301 + b'"',
    b'"' + "²".encode() * 3 + b'"',
]


@st.composite
def hostile_string(draw) -> Raw | str:
    """A string as a hostile client writes it: odd code points escaped or raw (invalid) UTF-8."""
    kind = draw(st.sampled_from(["escaped", "utf8", "raw"]))
    if kind == "raw":
        return Raw(draw(pick(RAW_STRINGS)))
    text = draw(odd_text)
    if kind == "escaped":
        return Raw(json.dumps(text).encode())  # ensure_ascii: \ud800 escapes
    # Surrogates written as the UTF-8 bytes a surrogate would have (CESU-8): invalid UTF-8.
    return Raw(
        b'"' + json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "surrogatepass") + b'"'
    )


# ---- numbers and structure -------------------------------------------------------------------

RAW_NUMBERS = [
    b"1" + b"0" * 400,
    b"-1" + b"0" * 400,
    b"9" * 5000,
    b"-" + b"9" * 5000,
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"1E400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"-0",
    b"0.0",
    b"1.0",
    b"2.5",
    b"1e2",
    b"-1",
    b"0",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"4294967296",
    b"0x10",
    b"01",
    b"+1",
    b".5",
    b"1.",
    b"1e",
    b"--1",
]
hostile_number = st.one_of(
    pick(RAW_NUMBERS).map(Raw),
    st.integers(300, 6000).map(lambda n: Raw(b"1" + b"0" * n)),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)


def deep(levels: int, kind: str) -> Raw:
    if kind == "list":
        return Raw(b"[" * levels + b"]" * levels)
    if kind == "dict":
        return Raw(b'{"a":' * levels + b"1" + b"}" * levels)
    return Raw(b'[{"role":"user","content":' * levels + b'"x"' + b"}]" * levels)


hostile_nesting = st.builds(
    deep, st.sampled_from([1000, 10_000, 100_000]), st.sampled_from(["list", "dict", "messages"])
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_value = st.one_of(
    hostile_string(),
    hostile_number,
    hostile_nesting,
    json_values,
    st.lists(hostile_string() | hostile_number, min_size=1, max_size=3),
    st.dictionaries(
        hostile_string() | odd_text,
        hostile_number | hostile_string() | st.floats(),
        min_size=1,
        max_size=3,
    ),
)
logit_bias = st.dictionaries(
    odd_text
    | hostile_string()
    | st.integers(0, 300).map(str)
    | pick(["²", "١", "１", "𝟘", "9" * 5000, "0" * 4301, "0" * 10, "258", "259", "-1", "+1", " 1"]),
    st.floats(-100, 100) | hostile_number,
    min_size=1,
    max_size=4,
)


# ---- whole bodies ----------------------------------------------------------------------------


def capped(body):
    """``body`` with its completion cap at most 2 tokens (set when absent or null): a request that
    is valid after hostile edits still generates next to nothing (else 1,024 tokens by default)."""
    if not isinstance(body, dict):
        return body
    caps = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    for name in caps:
        if type(body[name]) is int:
            body[name] = max(min(body[name], 2), -1)
    if not caps:
        body["max_tokens"] = 2
    return body


def bounded(body: dict) -> dict:
    """A valid request kept cheap: at most 2 tokens per choice, at most 2 choices, short prompts."""
    capped(body)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        body["max_completion_tokens"] = body["max_tokens"]
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    body["messages"] = body.get("messages") or BASE["messages"]
    for message in body["messages"]:  # the tiny model's context is small
        if isinstance(message.get("content"), str):
            message["content"] = message["content"][:200]
    return body


def from_schema(schema: dict, defs: dict | None = None) -> st.SearchStrategy:
    """Values valid under ``schema``: the JSON Schema subset pydantic writes (type, enum, const,
    anyOf, $ref, min/max, minLength, min/maxItems, required, additionalProperties)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(
            schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if kind == "array":
        return st.lists(
            from_schema(schema.get("items", {}), defs),
            min_size=schema.get("minItems", 0),
            max_size=schema.get("maxItems", 4),
        )
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(
                st.text(max_size=8),
                from_schema(schema.get("additionalProperties", {}), defs),
                max_size=4,
            )
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    return json_values  # {}: anything


valid_request = st.deferred(lambda: from_schema(SCHEMA)).map(
    lambda b: bounded({**b, "model": "tiny"})
)


def positions(value, path=()) -> list[tuple]:
    """Paths to every value and every object key in ``value`` (("key", path) for keys)."""
    found = [("value", path)]
    if isinstance(value, dict):
        for k, v in value.items():
            found.append(("key", path + (k,)))
            found.extend(positions(v, path + (k,)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(positions(v, path + (i,)))
    return found


def replace_at(value, where: tuple, new, *, key: bool = False):
    if not where:
        return new
    head, rest = where[0], where[1:]
    if isinstance(value, list):
        return [replace_at(v, rest, new, key=key) if i == head else v for i, v in enumerate(value)]
    if key and not rest:
        return {(new if k == head else k): v for k, v in value.items()}
    return {k: (replace_at(v, rest, new, key=key) if k == head else v) for k, v in value.items()}


@st.composite
def mutated_body(draw) -> bytes:
    """A valid request (every schema field reachable) with 1-3 hostile edits anywhere in it."""
    body = draw(valid_request)
    # Mostly one edit, so that the rest of the request is valid and the edit reaches deep code.
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        action = draw(
            st.sampled_from(
                [
                    "anywhere",
                    "anywhere",
                    "field",
                    "numeric",
                    "logit_bias",
                    "logit_bias",
                    "model",
                    "delete",
                    "unknown",
                ]
            )
        )
        if action == "anywhere":
            kind, where = draw(st.sampled_from(positions(body)[1:] or [("value", ("model",))]))
            if kind == "key":
                body = replace_at(body, where, draw(hostile_string()), key=True)
            else:
                body = replace_at(body, where, draw(hostile_value))
        elif action == "field":
            body[draw(st.sampled_from(FIELDS))] = draw(hostile_value)
        elif action == "numeric":
            body[draw(st.sampled_from(NUMERIC_FIELDS))] = draw(hostile_number)
        elif action == "logit_bias":
            body["logit_bias"] = draw(logit_bias)
        elif action == "model":
            body["model"] = draw(hostile_string())
        elif action == "delete":
            body.pop(draw(st.sampled_from(FIELDS)), None)
        else:
            body[draw(hostile_string() | odd_text)] = draw(hostile_value)
    return encode(capped(body))


def _with_prompt(size: int) -> bytes:
    return encode({**BASE, "messages": [{"role": "user", "content": "x" * size}]})


raw_body = st.one_of(
    st.binary(max_size=512),
    pick(
        [
            b"",
            b"[]",
            b"null",
            b'"text"',
            b"{}",
            b"1",
            b"true",
            b"{" * 3,
            b'{"model": "tiny",}',
            b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2',  # truncated
            b'{"model":"tiny","model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}',  # duplicate key
            b"\xef\xbb\xbf" + encode(BASE),  # a UTF-8 byte order mark
            json.dumps(BASE).encode("utf-16"),
            json.dumps(BASE).encode("utf-32"),
            encode(BASE) + b"\x00",
            encode(BASE) + b" trailing",
            b" \n\t" + encode(BASE),
            _with_prompt(5 * 1024 * 1024),  # over the body limit: 413
            _with_prompt(300_000),  # under it, over the tiny model's context
        ]
    ),
    hostile_nesting.map(encode),
)

CONTENT_TYPES = [
    None,
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "application/json; charset=latin-1",
    "application/xml",
    "*/*",
    "application/json, text/plain",
    "",
    "\xff".encode("latin-1"),
    "a" * 8000,
]
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
# What HTTP allows in a header value (no controls), so that the client can send it at all.
header_bytes = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 0x20 or 0x21 <= c <= 0x7E or c >= 0x80)
)


@st.composite
def extra_headers(draw) -> dict:
    """Odd Content-Types, Idempotency-Keys, forwarding headers and oversized headers."""
    headers: dict[str, str | bytes] = {}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(["content-type", "idempotency", "forwarded", "huge", "many", "odd"])
        )
        if kind == "content-type":
            ctype = draw(pick(CONTENT_TYPES))
            if ctype is not None:
                headers["Content-Type"] = ctype
        elif kind == "idempotency":
            headers["Idempotency-Key"] = draw(
                pick(["", "k", "a" * 128, "a" * 129, "x" * 5000, "é".encode(), "\u2028".encode()])
                | header_text
                | header_bytes
            )
        elif kind == "forwarded":
            name = draw(
                st.sampled_from(["X-Forwarded-For", "X-Real-IP", "Forwarded", "X-Forwarded-Proto"])
            )
            headers[name] = draw(
                pick(
                    [
                        "1.2.3.4",
                        "1.2.3.4, 5.6.7.8",
                        "::1",
                        "unknown",
                        "for=1.2.3.4",
                        ", , ,",
                        "999.999.999.999",
                        "a" * 10_000,
                    ]
                )
                | header_text
            )
        elif kind == "huge":
            headers[f"X-Huge-{draw(st.integers(0, 9))}"] = "h" * draw(
                st.sampled_from([8_000, 64_000, 200_000])
            )
        elif kind == "many":
            headers.update(
                {f"X-Many-{i}": "v" * 50 for i in range(draw(st.sampled_from([50, 200, 1000])))}
            )
        else:
            headers[
                draw(
                    st.sampled_from(
                        ["Accept", "Accept-Encoding", "Expect", "Connection", "Host", "User-Agent"]
                    )
                )
            ] = draw(
                st.sampled_from(
                    ["100-continue", "gzip;q=999", "close", b"\xff", "*/*", "text/event-stream"]
                )
                | header_text
            )
    return headers


@dataclass(frozen=True, repr=False)
class Request:
    method: str
    path: str
    headers: dict
    body: bytes
    account: str | None = None  # the account whose valid key it carries (None: no valid key)

    def short(self) -> str:
        heads = {
            k: (v[:80] + f"...({len(v)})" if len(v) > 80 else v)
            for k, v in list(self.headers.items())[:6]
        }
        if len(self.headers) > 6:
            heads["..."] = f"{len(self.headers) - 6} more"
        body = self.body[:300] + (
            f"...({len(self.body)} bytes)".encode() if len(self.body) > 300 else b""
        )
        return f"{self.method} {self.path} headers={heads} body={body!r}"

    # What hypothesis prints for a failing example (bodies run to megabytes).
    __repr__ = short

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.short())


@st.composite
def hostile_request(draw, keys: dict, admin: str) -> Request:
    """One hostile request; ``keys`` maps account names to valid keys ("alice" is the fuzzed one),
    ``keys["revoked"]`` is a revoked key and ``keys["bob_id"]`` another account's key id."""
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    kind = draw(
        st.sampled_from(
            ["body"] * 5 + ["raw", "raw", "headers", "headers", "auth", "admin", "route"]
        )
    )
    if kind == "body":
        return Request("POST", CHAT, auth, draw(mutated_body()), "alice")
    if kind == "raw":
        return Request("POST", CHAT, auth, draw(raw_body), "alice")
    if kind == "headers":
        return Request(
            "POST",
            CHAT,
            {**auth, **draw(extra_headers())},
            draw(mutated_body() | valid_request.map(encode)),
            "alice",
        )
    if kind == "auth":
        header = draw(
            pick(
                [
                    "",
                    "Bearer ",
                    "Basic abc",
                    "bearer dg-",
                    f"Bearer {keys['revoked']}",
                    "Bearer " + "k" * 100_000,
                    f"Bearer {keys['alice']}x",
                    f"Bearer  {keys['alice']}",
                    f"Token {keys['alice']}",
                    f"Bearer {admin}",
                ]
            )
            | header_text.map(lambda t: "Bearer " + t)
            | header_text
            | header_bytes
        )
        account = "alice" if header in (f"Bearer  {keys['alice']}",) else None
        return Request(
            "POST", CHAT, {"Authorization": header} if header else {}, encode(BASE), account
        )
    if kind == "admin":
        method, path = draw(
            st.sampled_from(
                [
                    ("GET", "/admin/keys"),
                    ("POST", "/admin/keys"),
                    ("DELETE", "/admin/keys/" + keys["bob_id"]),
                    ("GET", "/admin/accounts"),
                    ("GET", "/admin/accounts/bob/usage"),
                    ("GET", "/admin/verdicts"),
                    ("POST", "/admin/accounts/bob/verdict"),
                    ("GET", "/v1/usage"),
                ]
            )
        )
        who = draw(st.sampled_from(["alice", "none", "garbage"]))
        headers = (
            auth
            if who == "alice"
            else ({} if who == "none" else {"Authorization": "Bearer " + draw(header_text)})
        )
        body = draw(
            st.binary(max_size=64)
            | st.just(b'{"account": "mallory"}')
            | st.just(b'{"level": "block"}')
        )
        return Request(method, path, headers, body)
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = "/" + draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-.%~", max_size=30))
    return Request(method, path, auth, draw(st.binary(max_size=64)))


@st.composite
def admin_request(draw) -> Request:
    """An admin-key request with hostile inputs: limits, names, verdict scores, query values."""
    route = draw(st.sampled_from(["create", "verdict", "verdicts", "usage", "keys", "revoke"]))
    if route == "create":
        body = {
            "account": draw(
                pick(["acct", "a\x00b", "a/b", "..", "a" * 128, "a" * 129, ""])
                | hostile_string()
                | odd_text
            )
        }
        for name in draw(
            st.lists(
                st.sampled_from(["rpm", "tpm", "max_concurrent", "daily_tokens", "name"]),
                max_size=3,
            )
        ):
            body[name] = draw(
                hostile_number | st.sampled_from([10**30, 2**63, 2**63 - 1, 2**31, 0, -1, 1])
                if name != "name"
                else hostile_string() | odd_text
            )
        return Request("POST", "/admin/keys", {}, encode(body))
    if route == "verdict":
        body: dict = {
            "level": draw(
                st.sampled_from(["ok", "watch", "block", "OK", "", "nope"]) | hostile_string()
            )
        }
        if draw(st.booleans()):
            body["score"] = draw(hostile_number)
        if draw(st.booleans()):
            body["reasons"] = draw(st.lists(hostile_string() | odd_text, max_size=3))
        account = draw(pick(["fuzz-verdicts", "%ED%A0%80", "%00", "a%2Fb", "x" * 300]))
        return Request("POST", f"/admin/accounts/{account}/verdict", {}, encode(body))
    query = draw(
        pick(
            [
                "",
                "?limit=0",
                "?limit=" + "9" * 50,
                "?limit=-1",
                "?limit=1e3",
                "?account=%ED%A0%80",
                "?account=%00",
                "?limit=%C2%B2",
                "?account=" + "a" * 5000,
            ]
        )
    )
    if route == "verdicts":
        return Request("GET", "/admin/verdicts" + query, {}, b"")
    if route == "usage":
        return Request(
            "GET",
            "/admin/accounts/" + draw(pick(["bob", "%ED%A0%80", "%00", "x" * 300])) + "/usage",
            {},
            b"",
        )
    if route == "keys":
        return Request("GET", "/admin/keys" + query, {}, b"")
    return Request(
        "DELETE", "/admin/keys/" + draw(pick(["key_nope", "%ED%A0%80", "%00", "k" * 300])), {}, b""
    )


# ---- sending and checking ----------------------------------------------------------------------


@dataclass
class Probe:
    """Sends requests to one gateway and checks each answer; counts what it sent."""

    url: str
    sent: Counter = field(default_factory=Counter)  # by family
    statuses: Counter = field(default_factory=Counter)
    ledgered: Counter = field(
        default_factory=Counter
    )  # (account, status) of answers that must have a ledger row
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.client = httpx.Client(
            base_url=self.url,
            timeout=TIMEOUT_S,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    def close(self) -> None:
        self.client.close()

    def send(self, request: Request, family: str) -> httpx.Response:
        """Send ``request``; assert every invariant of one answer; return it (body read)."""
        # h11 (the client) refuses header values with edge whitespace; the server never sees them.
        headers = {k: v.strip() for k, v in request.headers.items() if v.strip()}
        try:
            with self.client.stream(
                request.method, request.path, headers=headers, content=request.body
            ) as resp:
                text = resp.read()
        except httpx.TimeoutException as exc:
            raise AssertionError(
                f"no answer within {TIMEOUT_S:.0f} s ({exc!r}) to {request.short()}"
            ) from None
        except httpx.RemoteProtocolError as exc:
            # The HTTP server may drop a connection whose request it cannot frame; never one it answered.
            raise AssertionError(f"connection dropped ({exc!r}) on {request.short()}") from None
        with self.lock:
            self.sent[family] += 1
            self.statuses[resp.status_code] += 1
            if (
                request.account
                and request.method == "POST"
                and request.path == CHAT
                and has_row(resp.status_code)
            ):
                self.ledgered[request.account, resp.status_code] += 1
        check_answer(resp, text, request)
        return resp


def has_row(status: int) -> bool:
    """Whether a chat request answered with ``status`` (with a valid key) gets a ledger row: all
    but those refused before the app reads the key (a body over the limit, a head refused)."""
    return status != 413 and status not in PROTOCOL_REFUSALS


# A head over the size limit (431) or too slow (408) is refused by the HTTP server before the app
# sees it (serve/server.py): OpenAI's error shape all the same, but no ledger row.
PROTOCOL_REFUSALS = (408, 431)


def check_answer(resp: httpx.Response, text: bytes, request: Request) -> None:
    where = f"{request.short()} -> {resp.status_code} {text[:400]!r}"
    assert resp.status_code < 500, where
    if request.method == "HEAD":
        return
    if resp.status_code >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(
                f"a {resp.status_code} not in OpenAI's error shape: {where}"
            ) from None
        assert set(error) == {"message", "type", "param", "code"} and error["message"], where
    elif request.path == CHAT and resp.status_code == 200:
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            events = [line[6:] for line in text.decode().split("\n") if line.startswith("data: ")]
            assert events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])), where
        else:
            assert json.loads(text)["choices"], where


def raw_exchange(url: str, data: bytes, timeout: float = TIMEOUT_S) -> bytes:
    """Send ``data`` on a fresh TCP connection; what came back before the server closed it or
    went quiet for ``timeout`` (an answer already complete is returned without waiting)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed while we were still sending
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"no answer within {timeout:.0f} s to {data[:200]!r}") from None
    return b"".join(chunks)
