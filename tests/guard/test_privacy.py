"""What the ledger keeps of prompts and answers (``--ledger-content``, ``--redact``): the pure row
transformation on tiny inputs, then a real gateway in each mode."""

from __future__ import annotations

import hashlib
import json

import pytest

from distillguard.errors import ConfigError
from distillguard.guard.privacy import LedgerPrivacy, compile_redactions, digest, private_texts, private_value

SHA_HI = hashlib.sha256(b"hi").hexdigest()
BODY = {"model": "tiny", "max_tokens": 5, "logprobs": True, "temperature": 0.5, "user": "alice@example.com",
        "stop": ["END"], "metadata": {"ticket": "T-1"},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_digest_is_the_sha256_of_the_utf8_text_and_its_length():
    assert digest("hi", "hashes") == {"sha256": SHA_HI, "chars": 2}
    assert digest("hi", "off") == {"chars": 2}
    assert digest("é", "hashes") == {"sha256": hashlib.sha256("é".encode()).hexdigest(), "chars": 1}
    # a lone surrogate (valid JSON, not UTF-8) is hashed, not an error that loses the row
    assert len(digest("\ud800", "hashes")["sha256"]) == 64


def test_hashes_keep_structure_and_numbers_and_hash_every_string():
    out = private_value(BODY, "hashes")
    assert {k: out[k] for k in ("model", "max_tokens", "logprobs", "temperature")} == \
           {"model": "tiny", "max_tokens": 5, "logprobs": True, "temperature": 0.5}
    assert [m["role"] for m in out["messages"]] == ["system", "user", "user"]
    assert out["messages"][1]["content"] == {"sha256": SHA_HI, "chars": 2}
    parts = json.dumps([{"type": "text", "text": "hi"}], ensure_ascii=False, sort_keys=True)
    assert out["messages"][2]["content"] == digest(parts, "hashes")
    assert out["user"]["chars"] == 17 and out["stop"][0]["chars"] == 3 and out["metadata"]["ticket"]["chars"] == 3
    assert not any(s in json.dumps(out) for s in ("alice", "be brief", "END", "T-1", '"hi"'))


def test_off_keeps_lengths_only():
    out = private_value(BODY, "off")
    assert out["messages"][1] == {"role": "user", "content": {"chars": 2}}
    assert "sha256" not in json.dumps(out) and "alice" not in json.dumps(out)


def test_redaction_in_full_mode_touches_text_not_structure():
    pattern = compile_redactions([r"[\w.+-]+@[\w-]+\.\w+", r"T-\d+"])
    out = private_value(BODY, "full", pattern)
    assert out["user"] == "[REDACTED]" and out["metadata"] == {"ticket": "[REDACTED]"}
    assert out["messages"][1] == {"role": "user", "content": "hi"} and out["model"] == "tiny"
    assert private_value(BODY, "full") == BODY  # no patterns: unchanged


def test_answers_in_each_mode():
    assert private_texts(["mail bob@x.org"], "full", compile_redactions([r"\S+@\S+"])) == "mail [REDACTED]"
    assert private_texts(["a", "b"], "full") == '["a", "b"]'  # n > 1: a JSON list, as the gateway stores it
    assert json.loads(private_texts(["hi"], "hashes")) == {"sha256": SHA_HI, "chars": 2}
    assert [d["chars"] for d in json.loads(private_texts(["hi", "abc"], "hashes"))] == [2, 3]
    assert private_texts(["hi"], "off") is None and private_texts([], "hashes") is None


def test_a_row_is_transformed_in_one_place():
    row = {"request_id": "r", "request_body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
           "response_text": "yo", "prompt_tokens": 3}
    assert LedgerPrivacy().row(row, ["yo"]) is row
    hashed = LedgerPrivacy("hashes").row(row, ["yo"])
    assert hashed["prompt_tokens"] == 3 and hashed["request_body"]["messages"][0]["content"]["sha256"] == SHA_HI
    assert json.loads(hashed["response_text"])["chars"] == 2 and row["response_text"] == "yo"  # not mutated


def test_bad_settings_name_the_value():
    with pytest.raises(ConfigError, match=r"--redact '\(unclosed' is not a valid regular expression"):
        LedgerPrivacy(redact=("(unclosed",))
    with pytest.raises(ConfigError, match="--ledger-content 'some': use one of full, hashes, off"):
        LedgerPrivacy("some")  # type: ignore[arg-type]
