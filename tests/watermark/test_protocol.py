"""Watermark schemes as plugins: a scheme installed as a real distribution (one module, one
entry point) is used by the embedder and the detector through WatermarkParams alone; a broken
one is reported and the built-ins stay."""

from __future__ import annotations

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.watermark import (
    SCHEMES,
    Scheme,
    WatermarkParams,
    account_key,
    apply_watermark,
    detect_tokens,
    green_mask,
    trace,
)
from distillguard.watermark.protocol import GROUP
from tests.plugin_dist import install_plugin

# Unigram-Watermark (Zhao et al. 2023): one green list per key whatever the context, so the
# independent units under the null are distinct tokens, not (context, token) pairs.
UNIGRAM = """
from distillguard.watermark.detect import pair_test, weighted_pairs
from distillguard.watermark.greenlist import KeyedHash
from distillguard.watermark.scheme import WatermarkParams

# built while the registry is loading this module: it sees the built-ins loaded before it
BASE = WatermarkParams(scheme="keyed-hash", delta=4.0)


class Unigram(KeyedHash):
    name = "unigram"

    def green_mask(self, params, hash_keys, contexts, vocab):
        return super().green_mask(params, hash_keys, contexts[:, :0], vocab)

    def is_green(self, params, hash_key, contexts, tokens, vocab):
        return super().is_green(params, hash_key, contexts[:, :0], tokens, vocab)

    def green_topk(self, params, hash_keys, contexts, top_ids, vocab):
        return super().green_topk(params, hash_keys, contexts[:, :0], top_ids, vocab)

    def _embed_rows(self, out, idx, sub, params, hash_keys, ctx):
        super()._embed_rows(out, idx, sub, params, hash_keys, ctx[:, :0])

    def detect(self, key, token_seqs, prompt_seqs, vocab_size, weights, cache=None):
        return pair_test(key, *weighted_pairs(token_seqs, 0, prompt_seqs, weights), vocab_size)


class Misnamed(Unigram):
    name = "something-else"
"""


@pytest.fixture
def unigram(monkeypatch, tmp_path):
    install_plugin(
        monkeypatch,
        tmp_path,
        "dg-unigram",
        {"dg_unigram": UNIGRAM, "dg_broken_scheme": "raise ImportError('needs a GPU')\n"},
        {
            GROUP: {
                "unigram": "dg_unigram:Unigram",
                "misnamed": "dg_unigram:Misnamed",
                "broken": "dg_broken_scheme:Scheme",
                "not-a-scheme": "dg_unigram:pair_test",
            }
        },
    )
    SCHEMES.reload()
    yield
    monkeypatch.undo()
    SCHEMES.reload()


def _sample(key, length, gen, vocab=2000):
    """Tokens of a fixed random bigram model, watermarked with ``key`` (None: not)."""
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(7))
    seq = [int(torch.randint(0, vocab, (1,), generator=gen))]
    for _ in range(length):
        logits = base.roll(seq[-1] % 89)[None, :] * 2
        if key is not None:
            logits = apply_watermark(logits, torch.tensor([[seq[-1]]]), [key])
        seq.append(int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen)))
    return seq


def test_an_installed_scheme_embeds_and_detects_through_params_alone(unigram):
    params = WatermarkParams(scheme="unigram", delta=4.0, candidates=2000)
    assert isinstance(params.impl, Scheme) and params.gamma == 0.25  # inherited defaults
    assert "unigram" not in SCHEMES.errors  # its import-time WatermarkParams did not break it
    keys = [account_key(b"m", f"acct-{i}", params) for i in range(5)]
    # one green list whatever the context
    masks = green_mask(params, [keys[0].hash_key] * 2, torch.tensor([[3], [1700]]), 2000)
    assert torch.equal(masks[0], masks[1])

    gen = torch.Generator().manual_seed(0)
    leaked = [_sample(keys[2], 120, gen) for _ in range(3)]
    clean = [_sample(None, 120, gen) for _ in range(3)]
    assert detect_tokens(keys[2], leaked, vocab_size=2000).p_value < 1e-6
    assert detect_tokens(keys[2], clean, vocab_size=2000).p_value > 1e-3
    assert trace(keys, leaked + clean, vocab_size=2000).accounts == ["acct-2"]
    # distinct tokens are the units: a text repeating one token scores it once
    assert detect_tokens(keys[0], [[5, 9, 9, 9, 9]], vocab_size=2000).scored == 2


def test_a_broken_scheme_is_reported_and_the_builtins_stay(unigram):
    assert {"keyed-hash", "lefthash-ref", "synthid", "unigram"} <= set(SCHEMES.all())
    assert "needs a GPU" in SCHEMES.errors["broken"]
    assert "make the two names equal" in SCHEMES.errors["misnamed"]
    assert "lacks parts of the Scheme protocol" in SCHEMES.errors["not-a-scheme"]
    with pytest.raises(ConfigError, match="'broken'.*failed to load.*needs a GPU"):
        WatermarkParams(scheme="broken")


def test_an_unknown_scheme_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown watermark scheme 'nope'.*keyed-hash.*synthid"):
        WatermarkParams(scheme="nope")
    assert "unigram" not in SCHEMES.all()  # the plugin left with its distribution


@pytest.mark.parametrize("name", ["keyed-hash", "lefthash-ref", "synthid"])
def test_builtins_satisfy_the_protocol_and_embed_at_their_stage(name):
    params = WatermarkParams(scheme=name)
    impl = params.impl
    assert isinstance(impl, Scheme) and impl.name == name
    key = account_key(b"k", "a", params)
    torch.manual_seed(0)
    x = torch.randn(2, 300).log_softmax(-1)
    ctx = torch.randint(0, 300, (2, params.context_width))
    other = "logprobs" if impl.stage == "logits" else "logits"
    assert apply_watermark(x, ctx, [key, None], other) is x  # not this scheme's stage
    out = apply_watermark(x, ctx, [key, None], impl.stage)
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
