"""Green lists: the reference LeftHash exactly, the keyed hash on known values, per-account keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.watermark import (
    REFERENCE_HASH_KEY,
    WatermarkParams,
    account_key,
    apply_watermark,
    green_mask,
    is_green,
    reference_key,
)
from distillguard.watermark.scheme import mix64, mix64_int

REF = WatermarkParams(scheme="lefthash-ref", gamma=0.25)


def test_reference_lefthash_green_lists_known_values():
    """seed = hash_key * previous token on a CPU generator, randperm, green = the first γ|V| ids:
    these ids are what the reference implementation (simple_1 / LeftHash, width 1) produces."""
    mask = green_mask(REF, [REFERENCE_HASH_KEY], torch.tensor([[42]]), 100)[0]
    assert sorted(mask.nonzero().flatten().tolist()) == sorted(
        [
            44,
            41,
            8,
            72,
            97,
            26,
            20,
            56,
            64,
            54,
            36,
            18,
            43,
            21,
            6,
            33,
            35,
            17,
            77,
            52,
            94,
            96,
            32,
            59,
            58,
        ]
    )
    big = green_mask(REF, [REFERENCE_HASH_KEY], torch.tensor([[198]]), 49152)[0]
    assert int(big.sum()) == int(49152 * 0.25)
    assert all(big[i] for i in [22037, 17107, 9376, 19735, 34885, 34165, 33044, 47962])
    # The detector's membership test agrees with the embedder's mask.
    toks = torch.arange(100)
    assert torch.equal(is_green(REF, REFERENCE_HASH_KEY, torch.full((100, 1), 42), toks, 100), mask)


def test_splitmix64_known_values_and_two_implementations_agree():
    # SplitMix64 seeded with 0 first outputs 0xE220A8397B1DCDAF: mix(0 + golden gamma).
    assert mix64_int(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 12345678901234567, 0x9E3779B97F4A7C15]
    signed = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    got = [int(x) & (2**64 - 1) for x in mix64(signed)]
    assert got == [mix64_int(v) for v in values]


def test_keyed_hash_green_rate_and_key_independence():
    params = WatermarkParams(gamma=0.25)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 50_000, (200_000, 1), generator=gen)
    tok = torch.randint(0, 50_000, (200_000,), generator=gen)
    a = is_green(params, 1234567, ctx, tok, 50_000)
    b = is_green(params, 7654321, ctx, tok, 50_000)
    sd = (0.25 * 0.75 / 200_000) ** 0.5
    assert abs(a.float().mean().item() - 0.25) < 5 * sd
    both = (a & b).float().mean().item()  # independent keys: P(green under both) = γ²
    assert abs(both - 0.0625) < 5 * (0.0625 * 0.9375 / 200_000) ** 0.5


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"gamma": 0}, "gamma"),
        ({"gamma": 1.2}, "gamma"),
        ({"delta": -1}, "delta"),
        ({"scheme": "lefthash-ref", "context_width": 2}, "context_width"),
        ({"scheme": "nope"}, "unknown"),
        ({"candidates": 0}, "candidates"),
        ({"min_entropy": -0.5}, "min_entropy"),
        ({"context_width": 0}, "context_width"),
        # SynthID fixes its rate and context: a different value is refused, not overwritten
        ({"scheme": "synthid", "gamma": 0.25}, "gamma=0.25 with scheme synthid"),
        ({"scheme": "synthid", "context_width": 1}, "context_width=1 with scheme synthid"),
    ],
)
def test_params_validate(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        WatermarkParams(**kwargs)


def test_unset_fields_take_the_schemes_defaults_and_explicit_ones_are_kept():
    assert (WatermarkParams().gamma, WatermarkParams().context_width) == (0.25, 1)
    assert WatermarkParams(gamma=0.4, context_width=3).gamma == 0.4
    sid = WatermarkParams(scheme="synthid")
    assert (sid.gamma, sid.context_width) == (0.5, sid.synthid.ngram_len - 1)
    # the resolved values are consistent, so a copy with another field is accepted
    assert dataclasses.replace(sid, delta=1.0).gamma == 0.5
    assert WatermarkParams(scheme="synthid", gamma=0.5, context_width=4) == sid


def test_account_keys_are_derived_distinct_and_hidden():
    p = WatermarkParams()
    a1, a2 = account_key(b"secret", "acct-1", p), account_key(b"secret", "acct-1", p)
    assert a1 == a2 and a1.key_id.startswith("wm_")
    assert account_key(b"secret", "acct-2", p).hash_key != a1.hash_key
    assert account_key(b"other", "acct-1", p).hash_key != a1.hash_key
    assert str(a1.hash_key) not in repr(a1) and a1.hash_key < 2**40
    assert reference_key().hash_key == REFERENCE_HASH_KEY


@pytest.mark.parametrize(
    "params", [WatermarkParams(candidates=10_000), REF, WatermarkParams(context_width=3)]
)
def test_apply_watermark_adds_delta_to_green_logits_only(params):
    vocab = 1000
    logits = torch.randn(3, vocab)
    contexts = torch.randint(0, vocab, (3, 3))
    keys = [account_key(b"s", "a", params), None, account_key(b"s", "b", params)]
    out = apply_watermark(logits, contexts, keys)
    assert torch.equal(out[1], logits[1])  # unwatermarked row untouched
    for b in (0, 2):
        mask = green_mask(
            params, [keys[b].hash_key], contexts[b : b + 1, -params.context_width :], vocab
        )[0]
        assert torch.allclose(out[b] - logits[b], params.delta * mask.float())


def test_candidate_restricted_embedding_matches_full_mask_on_candidates():
    params = WatermarkParams(candidates=50)
    logits = torch.randn(2, 1000)
    contexts = torch.randint(0, 1000, (2, 1))
    key = account_key(b"s", "a", params)
    out = apply_watermark(logits, contexts, [key, key])
    full = green_mask(params, [key.hash_key] * 2, contexts, 1000)
    for b in range(2):
        top = logits[b].topk(50).indices
        rest = torch.ones(1000, dtype=torch.bool)
        rest[top] = False
        assert torch.allclose((out[b] - logits[b])[top], params.delta * full[b, top].float())
        assert torch.equal(out[b][rest], logits[b][rest])


def test_min_entropy_defaults_per_scheme():
    assert WatermarkParams().min_entropy == 1.25  # keyed-hash skips near-certain positions
    assert REF.min_entropy == 0.0  # the reference biases every position
    assert WatermarkParams(min_entropy=None) == WatermarkParams(min_entropy=1.25)


@pytest.mark.parametrize(
    "params",
    [WatermarkParams(min_entropy=1.0), WatermarkParams(min_entropy=1.0, candidates=10_000)],
)
def test_apply_watermark_leaves_low_entropy_rows_alone(params):
    vocab = 1000
    logits = torch.randn(2, vocab)
    logits[0, 7] = 30.0  # row 0: the teacher is sure (entropy ~0)
    contexts = torch.randint(0, vocab, (2, 1))
    key = account_key(b"s", "a", params)
    out = apply_watermark(logits, contexts, [key, key])
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out[1], logits[1])  # row 1 is flat: watermarked as usual
