"""Run the API app under uvicorn with the limits a public endpoint needs (issue 24, items 9 and 11).

What is bounded, per connection, with the defaults of :class:`ServeConfig`:

- the request head (request line + headers): 16 KiB (``max_header_bytes``), else 431 and close
  (a lingering close: see :meth:`LimitedHttpToolsProtocol._refuse`);
- the time to send a head: 10 s from its first byte, or from the connection's start for the
  first request (``header_timeout_s``), else 408 and close. A client sending one byte a second
  (slowloris) holds a connection 10 s, not forever;
- the time to send a body: 60 s after its head, in all (``body_timeout_s``), else the connection
  is closed (the handler sees a disconnect: a 499 in the ledger);
- its size: 4 MiB (``max_body_bytes``, the app's own middleware: 413);
- idle time between requests: 5 s (``keep_alive_timeout_s``, uvicorn's own).

What is not bounded by default: the number of connections (``limit_concurrency`` answers 503
beyond it; otherwise the OS's file-descriptor limit), and the time a client takes to *read* a
response (a slow reader holds its stream; the engine stops generating for a client that is
gone, not for one that is slow). Put a reverse proxy in front for per-IP connection limits.

uvicorn's default HTTP parser (httptools) has neither a head-size limit nor any read timeout
before a request is complete; its h11 parser has the size limit (``h11_max_incomplete_event_size``)
but no timeout, and costs ~15% more CPU a request. So :func:`protocol_class` extends uvicorn's
httptools protocol with both, through uvicorn's documented ``http=`` (a protocol class).

Proxy headers: uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1 by default (or from
``$FORWARDED_ALLOW_IPS``), so any local process, or a proxy that passes the header through, could
choose the address the ledger records and account linking reads. Here no proxy is trusted
unless ``forwarded_allow_ips`` names it, and then only it.
"""

from __future__ import annotations

import asyncio
import gc
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from distillguard.serve.config import ServeConfig


def refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP response refusing a request the app never sees, with OpenAI's error body
    (clients parse errors the same way whichever layer refused them), closing the connection."""
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a head-size limit and head and body read timeouts.

    The limits are class attributes, set by :func:`protocol_class` (uvicorn builds one protocol
    per connection from the class it is given)."""

    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0
    body_timeout_s = 60.0
    linger_s = 2.0  # longest a refused connection is read (and dropped) after its refusal

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading_head = True  # from the connection's start and after each complete request
        self._head_bytes = 0
        self._heads = 0  # heads parsed on this connection
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._arm(self.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering after a refusal: the rest of what the client sends is dropped
            return
        if self._reading_head:
            room = self.max_head_bytes - self._head_bytes
            if len(data) > room:
                # Parse only what the limit allows: the head may end within it.
                head, rest = data[:room], data[room:]
                heads = self._heads
                self._head_bytes += len(head)
                super().data_received(head)
                if self._heads == heads:
                    self._refuse(
                        refusal(
                            431,
                            "Request Header Fields Too Large",
                            f"the request line and headers are larger than the limit of {self.max_head_bytes} bytes",
                            "request_header_too_large",
                        )
                    )
                elif not self.transport.is_closing():
                    self.data_received(rest)  # a body, or the next pipelined request's head
                return
            self._head_bytes += len(data)
        super().data_received(data)

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection: its own deadline
            self._arm(self.head_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._reading_head, self._heads = False, self._heads + 1
        self._arm(self.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head, self._head_bytes = True, 0
        super().on_message_complete()

    # deadlines
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if (
            self.cycle is None or self.cycle.response_complete
        ):  # no response of ours is being written
            self._refuse(
                refusal(
                    408,
                    "Request Timeout",
                    f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
                    "request_timeout",
                )
            )
        elif not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self) -> None:
        # The app may be answering already (a 401 before reading the body): no bytes of ours may
        # interleave with its response, so the connection just closes.
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Send ``response`` and close after it. Closing at once would leave the rest of what
        the client is still sending (a head over the limit goes on past it) unread, and the
        kernel answers unread bytes with a reset, which can destroy the refusal before the
        client reads it (the fuzzer saw "Server disconnected without sending a response").
        So: a lingering close (RFC 9112, section 9.6; nginx's ``lingering_close``): the refusal,
        then end of file, then whatever arrives is read and dropped until the client closes or
        ``linger_s`` passes."""
        self._disarm()
        if self.transport.is_closing():
            return
        self._refused = True
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(self.linger_s, self.transport.close)


def protocol_class(config: ServeConfig) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn should build connections from, with ``config``'s limits."""
    return type(
        "DistillguardHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_head_bytes": config.max_header_bytes,
            "head_timeout_s": config.header_timeout_s,
            "body_timeout_s": config.body_timeout_s,
        },
    )


def uvicorn_options(config: ServeConfig) -> dict:
    """Keyword arguments of ``uvicorn.run``/``uvicorn.Config`` for ``config``."""
    proxies = list(config.forwarded_allow_ips)
    return {
        "host": config.host,
        "port": config.port,
        "http": protocol_class(config),
        # Without trusted proxies the middleware is not installed at all: uvicorn would otherwise
        # fall back to $FORWARDED_ALLOW_IPS or 127.0.0.1.
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or None,
        "timeout_keep_alive": config.keep_alive_timeout_s,
        "limit_concurrency": config.limit_concurrency,
        "h11_max_incomplete_event_size": config.max_header_bytes,  # if someone swaps in http="h11"
        "ws": "none",  # no WebSocket routes: an Upgrade request is answered as plain HTTP
        "log_level": "warning",
        "timeout_graceful_shutdown": 5,
    }


# The cyclic garbage collector's youngest generation is collected every GEN0_THRESHOLD container
# allocations (Python's default is 700). Requests leave almost no cycles (profiled at 64 clients:
# under 100 objects found in ~650 collections), so a young collection mostly re-scans the objects
# of the requests in flight: ~10% of the event loop's CPU at 700, ~4% at 7000.
GEN0_THRESHOLD = 7000


class FreezeHeapAfterStartup:
    """ASGI wrapper: once the app has started (models loaded, guard connected), move every object
    alive to the collector's permanent generation (``gc.freeze``) and collect young objects less
    often (``GEN0_THRESHOLD``).

    The startup heap (~370,000 objects behind an upstream, more with a local model) never becomes
    garbage, yet every full collection scanned all of it: at 64 clients full collections took 29%
    of the event loop's CPU, young ones 8% more (``serve --upstream`` as bench/gateway_overhead.py
    runs it, CPU time per collection from ``gc.callbacks``). Only in the server process: tests
    that build many apps in one process keep the default collector."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def sent(message):
            if message["type"] == "lifespan.startup.complete":
                gc.collect()  # what startup left as garbage goes now, not frozen forever
                gc.freeze()
                gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
            await send(message)

        await self.app(scope, receive, sent)


def run(app, config: ServeConfig) -> None:
    """Serve ``app`` until interrupted (``distillguard serve``)."""
    import uvicorn

    uvicorn.run(FreezeHeapAfterStartup(app), **uvicorn_options(config))
