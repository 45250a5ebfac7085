"""``serve/server.py``'s FreezeHeapAfterStartup: the server process moves its startup heap out of
the collector's way once the app has started, and not before (a model still loading is not yet
the heap to freeze). What it buys is measured in bench/gateway_overhead.py, not asserted here."""

from __future__ import annotations

import asyncio
import gc

from distillguard.serve.server import GEN0_THRESHOLD, FreezeHeapAfterStartup


def test_the_heap_is_frozen_when_startup_completes_and_requests_pass_through():
    seen: list[tuple[str, int, int]] = []  # (message, frozen objects, gen0 threshold) as sent

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await send({"type": "lifespan.startup.begin-of-test"})
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "http.response.start", "status": 204, "headers": []})

    async def send(message):
        seen.append((message["type"], gc.get_freeze_count(), gc.get_threshold()[0]))

    async def receive():
        return {"type": "lifespan.startup"}

    threshold = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    try:
        wrapped = FreezeHeapAfterStartup(app)
        asyncio.run(wrapped({"type": "lifespan"}, receive, send))
        asyncio.run(wrapped({"type": "http"}, receive, send))
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    (before, frozen_0, t_0), (complete, frozen, t), (http, *_) = seen
    assert before == "lifespan.startup.begin-of-test" and frozen_0 == 0 and t_0 == threshold[0]
    assert complete == "lifespan.startup.complete" and frozen > 1000 and t == GEN0_THRESHOLD
    assert http == "http.response.start"
