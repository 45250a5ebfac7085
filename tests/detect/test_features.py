"""Per-request features from traffic records (DESIGN.md format)."""

from __future__ import annotations

import pytest

from distillguard.detect.features import extract, template_signature
from distillguard.errors import ConfigError
from tests.detect.synth import record


def test_features_of_a_harvest_request():
    f = extract(
        {
            "ts": 5,
            "account": "a",
            "ip": "1.2.3.4",
            "request": {
                "messages": [
                    {"role": "system", "content": "Think step by step."},
                    {"role": "user", "content": "What is 2+2?"},
                ],
                "max_tokens": 4096,
                "top_logprobs": 20,
                "n": 3,
                "temperature": 0,
            },
            "response": {"usage": {"prompt_tokens": 10, "completion_tokens": 90}},
            "label": "bulk",
        }
    )
    assert (
        f.prompt,
        f.continues,
        f.logprobs,
        f.top_logprobs,
        f.max_tokens,
        f.n,
        f.temperature,
        f.cot,
    ) == ("What is 2+2?", False, True, 20, 4096, 3, 0.0, True)
    assert f.system_hash is not None and f.tokens == 100 and f.ip == "1.2.3.4"


def test_continuation_last_user_turn_and_no_usage():
    f = extract(record("a", 1, "and then?", history=2))
    assert f.continues and f.prompt == "and then?" and f.system_hash is None and not f.cot
    assert (
        extract(
            {"ts": 1, "account": "a", "request": {"messages": [{"role": "user", "content": "hi"}]}}
        ).tokens
        > 0
    )


def test_chain_of_thought_markers():
    for text in (
        "Let's think step by step.",
        "Show your reasoning please",
        "<think>",
        "explain your reasoning",
    ):
        assert extract(record("a", 1, text)).cot, text
    assert not extract(record("a", 1, "What steps should I take to bake bread?")).cot


def test_template_signature_matches_fills_of_one_template_only():
    a = template_signature("Write a poem about the ocean for a beginner.")
    assert a == template_signature(
        "Write a sonnet about the Roman Empire for an expert.".replace("an ", "a ")
    )
    assert a != template_signature("Write a poem about my dog and the cat.")
    assert template_signature("hello there") is None


def test_malformed_request_fields_are_named():
    with pytest.raises(ConfigError, match="max_tokens"):
        extract(record("a", 1, "x", max_tokens="lots"))
    with pytest.raises(ConfigError, match="non-object"):
        extract({"ts": 1, "account": "a", "request": {"messages": ["hi"]}})
