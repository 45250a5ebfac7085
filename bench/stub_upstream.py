"""A minimal, fast OpenAI-compatible upstream for gateway benchmarks.

Answers ``POST /v1/chat/completions`` with one fixed completion (with ``usage``), ``GET
/v1/models`` with one model and anything else with 404. It is a bare asyncio protocol rather
than a web framework, with HTTP/1.1 keep-alive and pipelining, so that it costs a fraction of
what any proxy in front of it costs and the proxy's overhead is what a benchmark sees.

Not a general HTTP server: it expects well-formed requests with ``Content-Length`` (no chunked
uploads), as every client and proxy in the benchmark sends.

    python bench/stub_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

MODEL = "stub"

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 1732800000,
        "model": MODEL,
        "system_fingerprint": "fp_stub",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": "Paris is the capital of France."},
            }
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22},
    }
).encode()
MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 1732800000, "owned_by": "stub"}],
    }
).encode()
NOT_FOUND = json.dumps(
    {
        "error": {
            "message": "not found",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }
).encode()


def response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


ANSWERS = {
    (b"POST", b"/v1/chat/completions"): response(b"200 OK", COMPLETION),
    (b"POST", b"/chat/completions"): response(b"200 OK", COMPLETION),
    (b"GET", b"/v1/models"): response(b"200 OK", MODELS),
    (b"GET", b"/models"): response(b"200 OK", MODELS),
    (b"GET", b"/healthz"): response(b"200 OK", b'{"status":"ok"}'),
}
MISSING = response(b"404 Not Found", NOT_FOUND)


class StubProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:  # every complete request in the buffer (pipelining)
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                break  # the body has not all arrived yet
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            out.append(ANSWERS.get((method, path), MISSING))
            self.buf = self.buf[end + 4 + length :]
        if out:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    try:
        import uvloop  # optional: faster still where installed
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
