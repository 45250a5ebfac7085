"""``POST /v1/completions`` with ``echo`` and ``logprobs`` (the legacy shape vLLM and OpenAI
use), against the session's real ``distillguard serve --model tiny --no-guard`` through the
openai client: the prompt's logprobs are the model's own log-softmax, computed here directly;
scoring never disturbs a generation running beside it; bad input gets a 4xx in OpenAI's shape;
behind the guard the endpoint is refused, saying why."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.servers import serve_process

TEXTS = ["Hello there, friend.", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo"]


def direct_logprobs(lm, text: str, *, best: bool = False):
    """Token ids of ``text`` (no special tokens added) and log p(token t | tokens < t), t >= 1;
    with ``best`` also the likeliest token's logprob at each t."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    chosen = [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    return (ids, chosen, lp[:-1].max(-1).values.tolist()) if best else (ids, chosen)


def test_echo_logprobs_are_the_models_own(client, tiny_lm):
    # two prompts of different lengths in one request: one padded forward pass
    out = client.completions.create(
        model="tiny",
        prompt=TEXTS,
        max_tokens=0,
        echo=True,
        logprobs=3,
        extra_body={"add_special_tokens": False},
    )
    assert out.object == "text_completion" and len(out.choices) == 2
    for text, choice in zip(TEXTS, sorted(out.choices, key=lambda c: c.index)):
        ids, want, top1 = direct_logprobs(tiny_lm, text, best=True)
        lp = choice.logprobs
        assert choice.text == text and len(lp.tokens) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        # text_offset indexes the text: each token's text starts there
        assert [text[at : at + len(tok)] for tok, at in zip(lp.tokens, lp.text_offset)] == lp.tokens
        # the chosen token and the 3 likeliest (keyed by text: byte tokens that decode alike
        # share a key, as in OpenAI's format)
        for tok, got, top, best in zip(
            lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], top1
        ):
            assert top[tok] == pytest.approx(got) and 1 <= len(top) <= 4
            assert max(top.values()) == pytest.approx(best, abs=1e-4)
    # the chat template's special tokens are single tokens, as in the model's training
    assert "<|im_start|>" in out.choices[1].logprobs.tokens
    assert out.usage.prompt_tokens == sum(len(direct_logprobs(tiny_lm, t)[0]) for t in TEXTS)
    assert out.usage.completion_tokens == 0


def test_echo_with_a_completion_and_without_logprobs(client, tiny_lm):
    out = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=4, echo=True, logprobs=2, temperature=0
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("Hello") and out.usage.completion_tokens == 4
    assert len(lp.tokens) == 5 + 4 and lp.text_offset[:5] == [0, 1, 2, 3, 4]
    _, want = direct_logprobs(tiny_lm, "Hello")
    assert lp.token_logprobs[1:5] == pytest.approx(want, abs=1e-4)
    for got, top in zip(lp.token_logprobs[5:], lp.top_logprobs[5:]):
        assert got == pytest.approx(max(top.values()))  # greedy: the likeliest token
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=0, echo=True)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == "Hello"


def test_scoring_beside_a_generation_disturbs_neither(client, tiny_lm):
    """Scoring runs on the engine's worker between decoding steps: a greedy chat answer is the
    same with echo requests arriving while it is generated, and their logprobs stay exact."""
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    alone = client.chat.completions.create(**chat).choices[0].message.content
    _, want = direct_logprobs(tiny_lm, TEXTS[0])
    with ThreadPoolExecutor(4) as pool:
        answer = pool.submit(client.chat.completions.create, **chat)
        scored = [
            pool.submit(
                client.completions.create,
                model="tiny",
                prompt=TEXTS[0],
                max_tokens=0,
                echo=True,
                logprobs=0,
                extra_body={"add_special_tokens": False},
            )
            for _ in range(6)
        ]
        assert answer.result().choices[0].message.content == alone
        for s in scored:
            assert s.result().choices[0].logprobs.token_logprobs[1:] == pytest.approx(
                want, abs=1e-4
            )


GOOD = {"model": "tiny", "prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 0}


@pytest.mark.parametrize(
    "change, status, param, code",
    [
        ({"max_tokens": 0, "echo": False}, 400, "max_tokens", "invalid_value"),
        ({"prompt": 5}, 400, "prompt", "invalid_type"),
        ({"prompt": ""}, 400, "prompt", "invalid_value"),
        ({"prompt": []}, 400, "prompt", "invalid_value"),
        ({"prompt": ["x"] * 65}, 400, "prompt", "invalid_value"),
        ({"logprobs": 21}, 400, "logprobs", "invalid_value"),
        ({"max_tokens": -1}, 400, "max_tokens", "invalid_value"),
        ({"n": 2}, 400, "n", "invalid_value"),
        ({"stream": True}, 400, "stream", "unsupported_parameter"),
        ({"suffix": "x"}, 400, "suffix", "unknown_parameter"),
        ({"model": "nope"}, 404, "model", "model_not_found"),
        ({"prompt": "x" * 600}, 400, "prompt", "context_length_exceeded"),
        ({"prompt": "x" * 500, "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
    ],
)
def test_bad_input_gets_a_4xx_in_openais_shape(tiny_server, change, status, param, code):
    r = httpx.post(f"{tiny_server}/v1/completions", json={**GOOD, **change}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_a_body_that_is_not_json_is_refused(tiny_server):
    r = httpx.post(f"{tiny_server}/v1/completions", content=b"{nope", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        f"{tiny_server}/v1/completions",
        content=json.dumps(GOOD),
        headers={"Content-Type": "text/plain"},
        timeout=60,
    )
    assert r.status_code == 415


def test_behind_the_guard_prompt_logprobs_are_refused_and_it_says_why(tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    admin = {"DISTILLGUARD_ADMIN_KEY": "admin-" + uuid.uuid4().hex}
    with serve_process("--model", "tiny", "--db", db, env=admin) as url:
        r = httpx.post(f"{url}/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "unsupported_endpoint" and "--no-guard" in error["message"]
    assert "not served behind the guard" in error["message"]
