"""A huge prompt is tokenized once, off the event loop, and capped (issue 24 #3).

Before, a 4 MB prompt was tokenized twice on the event loop (for the limits' budget, then for
the engine): every other client, ``/healthz`` included, waited ~7 s. Now one with more bytes
than the cap's tokens can cover is refused without tokenizing, and one that must be tokenized
to tell is tokenized in a worker thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from distillguard.errors import ContextLengthExceeded
from distillguard.serve.config import ServeConfig
from distillguard.serve.local import LocalBackend
from distillguard.serve.schemas import parse_chat_request

HUGE = 3_500_000  # characters: under the 4 MiB body limit, seconds of tokenizing


# tiny's tokens cover at most 13 bytes (its special tokens written out): with this context,
# HUGE bytes pass the quick bound (HUGE / 13 tokens at least) and only tokenizing tells.
HUGE_CTX = 1_000_000


@pytest.fixture(scope="module")
def roomy_server(serve) -> str:
    return serve("--model", f"tiny:ctx={HUGE_CTX}", "--no-guard")


def test_health_answers_while_a_huge_prompt_is_tokenized(roomy_server):
    order: list[str] = []
    answer: dict = {}

    def huge() -> None:
        body = {
            "model": f"tiny:ctx={HUGE_CTX}",
            "messages": [{"role": "user", "content": "w " * (HUGE // 2)}],
            "max_tokens": 1,
        }
        resp = httpx.post(f"{roomy_server}/v1/chat/completions", json=body, timeout=120)
        order.append("huge")
        answer.update(status=resp.status_code, body=resp.json())

    sender = threading.Thread(target=huge)
    sender.start()
    # Let the body arrive (milliseconds on loopback) and its tokenizing (seconds) start.
    time.sleep(1.0)
    health = httpx.get(f"{roomy_server}/healthz", timeout=120)
    order.append("healthz")
    sender.join(120)
    assert health.status_code == 200
    assert order == ["healthz", "huge"]
    # The cap in tokens (default: the model's context) refuses it, in OpenAI's shape.
    assert answer["status"] == 400
    assert answer["body"]["error"]["code"] == "context_length_exceeded"
    assert answer["body"]["error"]["param"] == "messages"
    assert (
        f"are {HUGE + 19} tokens" in answer["body"]["error"]["message"]
    )  # counted (+ the template), so tokenized


def test_a_prompt_too_long_for_any_tokenization_is_refused_at_once(tiny_server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "w " * (HUGE // 2)}],
        "max_tokens": 1,
    }
    resp = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert (
        f"at least {HUGE // 13} tokens" in error["message"]
        and "at most 512 tokens" in error["message"]
    )


def test_max_prompt_tokens_caps_prompts_below_the_context(tiny_lm):
    backend = LocalBackend(tiny_lm, ServeConfig(model="tiny", max_prompt_tokens=40))

    def request(text: str):
        return parse_chat_request(
            json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 5}
            ).encode()
        )

    short = request("hi")
    budget = asyncio.run(backend.budget(short))
    assert budget == backend.prompt_tokens(short) + 5 <= 40 + 5
    with pytest.raises(ContextLengthExceeded, match="at most 40 tokens") as err:
        asyncio.run(backend.budget(request("a fairly long question " * 10)))
    assert err.value.status_code == 400 and err.value.param == "messages"


def test_serve_takes_the_prompt_cap_and_prefill_chunk_as_options():
    """`serve --max-prompt-tokens / --prefill-chunk` (they were settable only by environment)."""
    from tests.servers import serve_process

    with serve_process(
        "--model", "tiny", "--no-guard", "--max-prompt-tokens", "40", "--prefill-chunk", "4"
    ) as url:
        body = {"model": "tiny", "max_tokens": 3}
        short = httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "messages": [{"role": "user", "content": "a short question"}]},
            timeout=60,
        )
        long = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                **body,
                "messages": [{"role": "user", "content": "a fairly long question " * 10}],
            },
            timeout=60,
        )
    assert short.status_code == 200  # prefilled in chunks of 4 tokens
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "context_length_exceeded"
    assert "at most 40 tokens" in long.json()["error"]["message"]
