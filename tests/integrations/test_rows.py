"""The vLLM plugin's batch state and step, in the main environment (no vLLM): the same
continuous-batching scenario as in vLLM's environment (test_vllm_plugin.py), against our engine's
own step, bit for bit; and the key material the gateway sends."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.integrations.rows import WatermarkRows
from distillguard.serve.keymaterial import XARG, Sampler, decode, encode
from distillguard.watermark import WatermarkParams, account_key
from tests.integrations import scenario


def test_plugin_rows_equal_the_engine_bit_for_bit_through_joins_leaves_and_moves():
    result = scenario.run_plain()
    assert result["steps"] == 13 and result["keyed_rows"] == 54 and result["plain_rows"] == 4
    # the preempted SynthID request, resumed with its output so far, matched at every step after
    assert result["resumed_rows"] == 3
    # every scheme's unpenalised rows were changed by the watermark at some step, so equality
    # with the engine is not the equality of two untouched tensors
    assert result["changed"] == ["kh", "synthid", "synthid-greedy"]


def test_a_wrong_context_is_caught(monkeypatch):
    """The comparison can fail: contexts shifted by one token (an off-by-one in the live output
    list) differ from the engine at the first step."""
    real = WatermarkRows.contexts

    def shifted(self, rows, width, device):
        return real(self, rows, width + 1, device)[:, :-1]

    monkeypatch.setattr(WatermarkRows, "contexts", shifted)
    with pytest.raises(AssertionError, match="differs from the engine"):
        scenario.run_plain()


def test_key_material_round_trips_and_never_holds_the_master_secret():
    secret = b"master-secret-never-sent"
    for params in (
        WatermarkParams(),
        WatermarkParams(delta=4.0),
        WatermarkParams(scheme="lefthash-ref"),
        WatermarkParams(scheme="synthid"),
    ):
        key = account_key(secret, "acct-a", params)
        raw = encode(key, Sampler(0.7, 0.9, 0.1, -0.2))
        assert secret.decode() not in raw
        back, sampler = decode(raw)
        assert back.params == key.params and back.hash_key == key.hash_key
        assert back.key_id == key.key_id and sampler == Sampler(0.7, 0.9, 0.1, -0.2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.pop("hash_key"), "lacks 'hash_key'"),
        (lambda m: m.update(hash_key=-3), "positive 63-bit"),
        (lambda m: m.update(scheme="nope"), "nope"),
        (lambda m: m.update(v=99), "version 1"),
        (lambda m: m.update(top_p=3), "out of range"),
        (lambda m: m.update(synthid={"depth": 0}), "bad"),
    ],
)
def test_bad_key_material_is_refused_with_its_reason(mutate, message):
    m = json.loads(encode(account_key(b"s", "a", WatermarkParams()), Sampler()))
    mutate(m)
    with pytest.raises(ConfigError, match=message):
        decode(json.dumps(m))


def test_keyed_hash_marks_rows_with_impossible_tokens():
    """vLLM's min_tokens, bad words and allowed ids set logits to -inf before the plugin runs;
    the entropy gate used to read NaN there and leave the row unwatermarked."""
    key = account_key(b"s", "acct-a", WatermarkParams())
    rows = WatermarkRows()
    params = SimpleNamespace(extra_args={XARG: encode(key, Sampler(1.0))})
    rows.update([], [(0, params, [5, 6, 7], [])], [])
    logits = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    logits[0, :10] = float("-inf")
    out = rows.apply(logits.clone())
    plain = logits.log_softmax(-1)
    assert not torch.equal(out, plain)
    assert torch.isneginf(out[0, :10]).all()


def test_a_batch_without_keys_is_returned_as_it_came():
    rows = WatermarkRows()
    rows.update(
        [],
        [
            (0, SimpleNamespace(extra_args=None), [1], []),
            (1, SimpleNamespace(extra_args={"other": 1}), [1], []),
        ],
        [],
    )
    logits = torch.randn(2, 64)
    assert rows.apply(logits) is logits
