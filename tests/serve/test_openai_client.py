"""The server through the real ``openai`` client: the contract every distiller script relies on.

The tiny model's vocabulary is 256 byte tokens plus three specials (the end-of-turn token
among them). Tests that need an exact length forbid the specials with ``logit_bias`` so a
completion always runs to ``max_tokens`` and every token's bytes are part of the text.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three rivers in Europe."},
]


@pytest.fixture(scope="module")
def no_specials(tiny_lm) -> dict[str, int]:
    """logit_bias that makes the special and end-of-generation tokens impossible."""
    return {
        str(i): -100 for i in sorted(set(tiny_lm.tokenizer.all_special_ids) | tiny_lm.eos_token_ids)
    }


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **kwargs})


def text_of(client, **kwargs) -> str:
    return chat(client, **kwargs).choices[0].message.content


def streamed(client, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_usage_is_exact(client, tiny_lm, seed):
    resp = chat(client, max_tokens=16, seed=seed)
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.role == "assistant"
    assert resp.usage.prompt_tokens == len(tiny_lm.chat_ids(MESSAGES))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 16
    else:  # the end-of-turn token came first; it counts as a completion token
        assert 1 <= resp.usage.completion_tokens < 16


def test_usage_counts_developer_messages_as_the_template_renders_them(client, tiny_lm):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    # The server renders "developer" as "system" (ChatML has no developer role).
    rendered = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert resp.usage.prompt_tokens == len(tiny_lm.chat_ids(rendered))


def test_logprobs_are_consistent(client, tiny_lm, no_specials):
    resp = chat(
        client, max_tokens=24, seed=5, logprobs=True, top_logprobs=5, logit_bias=no_specials
    )
    choice = resp.choices[0]
    entries = choice.logprobs.content
    assert choice.finish_reason == "length"
    assert len(entries) == resp.usage.completion_tokens == 24
    for e in entries:
        top = e.top_logprobs
        assert len(top) == 5
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        assert all(math.exp(v) <= 1.0 for v in values + [e.logprob])
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
        assert len({bytes(t.bytes) for t in top}) == 5  # five distinct tokens
        same = [t for t in top if bytes(t.bytes) == bytes(e.bytes)]
        if same:
            assert e.logprob == pytest.approx(same[0].logprob, abs=1e-6)
        else:
            assert e.logprob <= values[-1]
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
    # Every token is one byte of the text: the bytes reassemble it exactly.
    assert all(len(e.bytes) == 1 for e in entries)
    assert (
        b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
        == choice.message.content
    )


def test_logprobs_show_sampling_at_temperature_1(client, no_specials):
    # At temperature 1 some chosen tokens are not the most likely one (else this is greedy).
    entries = (
        chat(client, max_tokens=24, seed=5, logprobs=True, top_logprobs=1, logit_bias=no_specials)
        .choices[0]
        .logprobs.content
    )
    assert any(e.logprob < e.top_logprobs[0].logprob for e in entries)


def test_same_seed_same_text_and_different_seeds_differ(client, no_specials):
    kw = dict(max_tokens=16, temperature=1.0, logit_bias=no_specials)
    texts = {seed: text_of(client, seed=seed, **kw) for seed in (10, 11, 12, 13)}
    assert text_of(client, seed=10, **kw) == texts[10]
    assert text_of(client, seed=13, **kw) == texts[13]
    assert len(set(texts.values())) == 4, texts


def test_temperature_0_is_deterministic_and_greedy(client, no_specials):
    kw = dict(max_tokens=16, temperature=0, logprobs=True, top_logprobs=1, logit_bias=no_specials)
    first, second = chat(client, seed=1, **kw), chat(client, seed=2, **kw)
    assert first.choices[0].message.content == second.choices[0].message.content
    for e in first.choices[0].logprobs.content:
        assert bytes(e.bytes) == bytes(e.top_logprobs[0].bytes)  # always the argmax


def test_n_choices_differ(client, no_specials):
    resp = chat(client, n=3, max_tokens=12, seed=4, logit_bias=no_specials)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) == 3, texts
    assert resp.usage.completion_tokens == 3 * 12
    # The same seeded request gives the same three choices again.
    assert [
        c.message.content
        for c in chat(client, n=3, max_tokens=12, seed=4, logit_bias=no_specials).choices
    ] == texts


def stop_from(text: str) -> str:
    """A 3-character piece of ``text`` after its first few characters, used as a stop string.

    Whole characters only: a U+FFFD in ``text`` stands for bytes that are not UTF-8, which a
    stop string cannot name.
    """
    for k in range(len(text) // 3, len(text) - 3):
        piece = text[k : k + 3]
        if "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no stop string candidate in {text!r}; pick another seed")


@pytest.fixture(scope="module")
def long_text(client, no_specials) -> str:
    return text_of(client, max_tokens=40, seed=21, logit_bias=no_specials)


def test_stop_sequence(client, no_specials, long_text):
    stop = stop_from(long_text)
    expected = long_text[: long_text.index(stop)]
    resp = chat(client, max_tokens=40, seed=21, logit_bias=no_specials, stop=stop)
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 40


def test_stop_sequence_streamed(client, no_specials, long_text):
    stop = stop_from(long_text)
    text, chunks = streamed(client, max_tokens=40, seed=21, logit_bias=no_specials, stop=[stop])
    assert text == long_text[: long_text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client, no_specials):
    kw = dict(max_tokens=20, seed=8, logit_bias=no_specials, logprobs=True, top_logprobs=2)
    whole = chat(client, **kw)
    text, chunks = streamed(client, stream_options={"include_usage": True}, **kw)
    assert text == whole.choices[0].message.content
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    # logprob entries arrive spread over the chunks, in order, and are the same.
    streamed_entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed_entries] == [
        (e.token, e.logprob) for e in whole.choices[0].logprobs.content
    ]
    # The last chunk carries only the usage; the one before, the finish reason.
    last, finishing = chunks[-1], chunks[-2]
    assert last.choices == [] and last.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert finishing.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_streaming_without_usage(client):
    _, chunks = streamed(client, max_tokens=5, seed=1)
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_completion_tokens(client, no_specials):
    resp = chat(client, max_completion_tokens=7, seed=3, logit_bias=no_specials, logprobs=True)
    assert resp.usage.completion_tokens == 7
    assert len(resp.choices[0].logprobs.content) == 7
    assert resp.choices[0].finish_reason == "length"


def test_concurrent_requests_match_sequential(client, no_specials):
    # Eight requests with their own prompt lengths, seeds and sampling parameters, sent at
    # once, are batched together (and join batches mid-generation): each row must be sampled
    # with its own parameters and generator, exactly as when it is sent alone. Temperature 1
    # is exact here: per-row generators make the draws independent of the batch, and batched
    # logits differ from unbatched ones by float rounding only, far below what would move a
    # multinomial draw across a token boundary (rerun with temperature 0 if this ever flakes).
    def request(i: int) -> str:
        messages = [{"role": "user", "content": "Tell me a story. " * (i + 1)}]
        return (
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=24,
                seed=100 + i,
                logit_bias=no_specials,
                temperature=[1.0, 0.0, 0.7, 1.3][i % 4],
                top_p=[1.0, 1.0, 0.9, 0.8][i % 4],
            )
            .choices[0]
            .message.content
        )

    alone = [request(i) for i in range(8)]
    barrier = threading.Barrier(8)

    def together(i: int) -> str:
        barrier.wait()
        return request(i)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(together, range(8))) == alone
