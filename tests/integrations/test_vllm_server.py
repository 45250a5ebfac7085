"""A real vLLM server (vLLM's own virtualenv, the embedded teacher, ``--logits-processors`` with
our plugin) on loopback, asked with the openai client: a request carrying an account's key
material in ``vllm_xargs`` is watermarked (traced to that account by our detector, Holm over
accounts), an unkeyed control is not, and greedy rows without a key are not changed by keyed
rows running beside them in the same batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from distillguard.serve.keymaterial import XARG, Sampler, encode
from distillguard.watermark import WatermarkParams, account_key, trace
from distillguard.watermark.detect import tokenize
from tests.integrations.conftest import SERVED_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# Fixed (with the fixed seeds): the same answers and p-values on every run. Written down before
# any run, not picked among secrets that pass.
SECRET = b"vllm-plugin-test-secret-0"
ACCOUNTS = ["acct-a", "acct-b", "acct-c"]
PROMPTS = [
    "Tell me about rivers.",
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What should I pack for a week of hiking?",
    "Describe the water cycle to a child.",
    "Give me three tips for learning to cook.",
    "Why do cats purr?",
    "How do airplanes stay in the air?",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def client(vllm_server):
    with openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="x", max_retries=0, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from distillguard.models.loader import load_tokenizer

    return load_tokenizer("smollm2")


def _ask(client, prompt, seed, key=None, temperature=0.7, logprobs=False):
    extra = {}
    if key is not None:
        extra["vllm_xargs"] = {XARG: encode(key, Sampler(temperature=temperature))}
        temperature = 0.0 if temperature == 0 else 1.0  # the plugin samples; vLLM stays neutral
    r = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        seed=seed,
        logprobs=logprobs or None,
        top_logprobs=3 if logprobs else None,
        extra_body=extra or None,
    )
    return r.choices[0]


def _ask_all(client, keys_and_seeds, **kw):
    with ThreadPoolExecutor(len(keys_and_seeds)) as pool:  # one vLLM batch
        futures = [
            pool.submit(_ask, client, PROMPTS[i % len(PROMPTS)], seed, key, **kw)
            for i, (key, seed) in enumerate(keys_and_seeds)
        ]
        return [f.result().message.content for f in futures]


def _trace(tokenizer, params, texts):
    keys = [account_key(SECRET, a, params) for a in ACCOUNTS]
    prompts = []
    for i in range(len(texts)):  # the prompt as vLLM tokenised it (the same chat template)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return trace(keys, tokenize(tokenizer, texts), vocab_size=len(tokenizer), prompt_seqs=prompts)


@pytest.mark.parametrize("scheme", ["keyed-hash", "synthid"])
def test_keyed_requests_trace_to_their_account_and_a_control_to_none(client, tokenizer, scheme):
    params = WatermarkParams(scheme=scheme)
    key_a = account_key(SECRET, "acct-a", params)
    marked = _ask_all(client, [(key_a, 100 + i) for i in range(len(PROMPTS))])
    control = _ask_all(client, [(None, 100 + i) for i in range(len(PROMPTS))])
    assert all(marked) and marked != control
    found = _trace(tokenizer, params, marked)
    assert found.accounts == ["acct-a"], found.to_dict()
    p_holm = dict(zip(ACCOUNTS, found.adjusted_p))
    assert p_holm["acct-b"] > 1e-6 and p_holm["acct-c"] > 1e-6
    assert _trace(tokenizer, params, control).accounts == []


def _greedy_beside(client, key):
    """Three greedy unkeyed answers, asked while six sampled requests (keyed with ``key``, or
    not) share vLLM's batch with them."""
    with ThreadPoolExecutor(9) as pool:
        beside = [
            pool.submit(_ask, client, PROMPTS[(i + 3) % len(PROMPTS)], i, key) for i in range(6)
        ]
        greedy = [
            pool.submit(_ask, client, p, 0, temperature=0.0, logprobs=True) for p in PROMPTS[:3]
        ]
        out = [f.result() for f in greedy]
        [f.result() for f in beside]
    return out


def _max_diff(a, b) -> float:
    return max(
        abs(x.logprob - y.logprob)
        for ca, cb in zip(a, b)
        for x, y in zip(ca.logprobs.content, cb.logprobs.content)
    )


def test_unkeyed_greedy_rows_are_untouched_by_keyed_rows_beside_them(client):
    """Greedy answers without a key: alone, beside unkeyed rows, beside keyed rows. The plugin
    rewrites keyed rows only and returns the others bit for bit (tests/integrations/test_rows.py;
    with no keyed row it returns vLLM's tensor as it came, so an unkeyed request alone is plain
    vLLM's). Across batch shapes vLLM's own logits move in the 6th digit (its CPU kernels are not
    batch-invariant, with or without the plugin: measured here), so the texts must be equal and
    the logprobs equal within that float noise."""
    alone = [_ask(client, p, 0, temperature=0.0, logprobs=True) for p in PROMPTS[:3]]
    plain = _greedy_beside(client, None)
    keyed = _greedy_beside(client, account_key(SECRET, "acct-b", WatermarkParams()))
    texts = [c.message.content for c in alone]
    assert [c.message.content for c in plain] == texts
    assert [c.message.content for c in keyed] == texts
    noise = max(_max_diff(alone, plain), 1e-6)
    assert _max_diff(alone, keyed) <= max(20 * noise, 1e-4), (noise, _max_diff(alone, keyed))
