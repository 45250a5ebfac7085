"""SynthID-Text tournament sampling with per-account keys (watermark.synthid): the step keeps the
distribution in expectation over keys, the detector's null is exact, and it finds the watermark."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom

from distillguard.errors import ConfigError
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.synthid import (
    SynthIDParams,
    SynthIDTopK,
    detect_synthid,
    layer_keys,
    position_weights,
    processor_for,
    synthid_units,
)

SECRET = b"test-synthid"
P = SynthIDParams(depth=12, top_k=64)
V = 500


def key(i: int):
    return account_key(SECRET, f"acct-{i}", WatermarkParams())


def test_layer_keys_are_per_account_and_deterministic():
    a, ta = layer_keys(key(0).hash_key, P)
    b, tb = layer_keys(key(1).hash_key, P)
    assert (a, ta) == layer_keys(key(0).hash_key, P)
    assert len(a) == P.depth and len(set(a)) == P.depth and not set(a) & set(b) and ta != tb
    assert all(0 < k < 2**63 for k in a + [ta])


def test_bad_params_are_refused():
    with pytest.raises(ConfigError, match="depth"):
        SynthIDParams(depth=0)


def test_tournament_keeps_the_tail_and_the_distribution_in_expectation():
    torch.manual_seed(0)
    logits = torch.randn(1, V) * 2
    ids = torch.randint(0, V, (1, 6))
    p0 = logits.softmax(-1)[0]
    top = p0.topk(P.top_k).indices
    tail = torch.ones(V, dtype=torch.bool)
    tail[top] = False
    mean = torch.zeros(V)
    n = 150
    for i in range(n):
        p = SynthIDTopK(key(i).hash_key, P)(ids, logits).softmax(-1)[0]
        assert torch.allclose(p[tail], p0[tail], atol=1e-7)  # the tail is left as it is
        assert math.isclose(float(p.sum()), 1.0, abs_tol=1e-5)
        mean += p / n
    # distortion-free per step in expectation over keys: the average over 150 keys is the
    # original distribution (total variation shrinks like 1/sqrt(keys); one key moves it ~0.3)
    one = SynthIDTopK(key(0).hash_key, P)(ids, logits).softmax(-1)[0]
    assert 0.5 * float((mean - p0).abs().sum()) < 0.05 < 0.5 * float((one - p0).abs().sum())


def test_null_is_binomial_half_over_many_keys():
    """Texts independent of the key: the p-values are (discrete-)uniform; at α = 1e-2 and 5e-2
    the false-positive rate over 30 texts x 40 keys stays within 3σ of α."""
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, V, (48,), generator=g).tolist() for _ in range(30)]
    prompts = [torch.randint(0, V, (8,), generator=g).tolist() for _ in range(30)]
    ps, zs = [], []
    for k in range(40):
        proc = processor_for(key(k).hash_key, P)
        for t, pr in zip(texts, prompts):
            d = detect_synthid(key(k), [t], [pr], params=P, proc=proc)
            ps.append(d.p_value)
            zs.append(d.z)
    n = len(ps)
    for alpha in (1e-2, 5e-2):
        assert sum(p < alpha for p in ps) / n <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n)
    assert abs(sum(zs) / n) < 3 / math.sqrt(n) * 1.5  # mean z about 0 (loose: texts repeat across keys)


def test_units_count_each_table_index_once_and_skip_prompt_ngrams():
    proc = processor_for(key(0).hash_key, P)
    ans = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9]
    g1, w1 = synthid_units(proc, [ans], [[1, 2, 3, 4]], P.table_size)
    g2, w2 = synthid_units(proc, [ans[:5]], [[1, 2, 3, 4]], P.table_size)
    # the repeat of [5..9] adds only the n-grams that span the seam, and no index twice
    assert len(g1) <= (len(ans)) * P.depth and len(g1) > len(g2)
    g3, _ = synthid_units(proc, [ans], [[1, 2, 3, 4] + ans], P.table_size)  # all its n-grams in the prompt
    assert len(g3) == 0
    assert set(w1.tolist()) == {1}


def test_detects_watermarked_sampling_and_not_other_keys():
    """Sampling a fixed random model through the tournament: detected under its key, not others."""
    torch.manual_seed(2)
    table = torch.randn(V, V) * 2.0  # next-token logits by previous token: a toy bigram model
    proc = SynthIDTopK(key(0).hash_key, P)
    seqs, prompts = [], []
    for s in range(6):
        ids = torch.randint(0, V, (1, 4))
        prompts.append(ids[0].tolist())
        for _ in range(60):
            scores = proc(ids, table[ids[:, -1]])
            ids = torch.cat([ids, torch.multinomial(scores.softmax(-1), 1)], dim=1)
        seqs.append(ids[0, 4:].tolist())
    own = detect_synthid(key(0), seqs, prompts, params=P)
    assert own.p_value < 1e-6
    others = [detect_synthid(key(k), seqs, prompts, params=P).p_value for k in range(1, 6)]
    assert min(others) > 1e-3
    # the exact tail agrees with scipy's binomial
    assert math.isclose(own.log10_p, float(binom.logsf(own.green - 1, own.scored, 0.5)) / math.log(10), rel_tol=1e-9)


def test_position_weights():
    assert position_weights(torch.tensor([1.0, 0.5, 0.125])) == [0, 4, 7]
