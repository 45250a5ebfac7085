"""SynthID-Text tournament sampling with per-account keys (watermark.synthid): the step keeps the
distribution in expectation over keys, the detector's null is exact, and it finds the watermark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from distillguard.errors import ConfigError
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.synthid import (
    SynthIDParams,
    SynthIDTopK,
    depth_weights,
    detect_synthid,
    layer_keys,
    layer_weights,
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
    assert (
        abs(sum(zs) / n) < 3 / math.sqrt(n) * 1.5
    )  # mean z about 0 (loose: texts repeat across keys)


def test_units_count_each_ngram_once_and_skip_prompt_ngrams():
    proc = processor_for(key(0).hash_key, P)
    ans = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9]
    n = P.ngram_len
    distinct = {tuple(([1, 2, 3, 4] + ans)[i - n + 1 : i + 1]) for i in range(4, 4 + len(ans))}
    g1, w1 = synthid_units(proc, [ans], [[1, 2, 3, 4]], P.table_size)
    g2, w2 = synthid_units(proc, [ans[:5]], [[1, 2, 3, 4]], P.table_size)
    # the repeat of [5..9] adds only the n-grams that span the seam: one pair per distinct n-gram and layer
    assert (
        int(w1.sum()) == len(distinct) * P.depth < len(ans) * P.depth
        and int(w2.sum()) == 5 * P.depth
    )
    g3, _ = synthid_units(
        proc, [ans], [[1, 2, 3, 4] + ans], P.table_size
    )  # all its n-grams in the prompt
    assert len(g3) == 0


def test_pairs_on_one_table_index_add_up_and_the_weighted_tail_is_exact():
    """A small table: many (n-gram, layer) pairs share an index, whose weight is their number;
    the p-value is the exact tail of Σ W_i·g_i (checked against a sum over scipy binomials)."""
    small = SynthIDParams(depth=12, top_k=64, table_size=64)
    proc = processor_for(key(0).hash_key, small)
    g = torch.Generator().manual_seed(3)
    texts = [torch.randint(0, V, (40,), generator=g).tolist() for _ in range(4)]
    prompts = [[1, 2, 3, 4]] * 4
    gs, ws = synthid_units(proc, texts, prompts, small.table_size)
    assert (
        len(gs) <= 64 and int(ws.max()) > 1 and int(ws.sum()) > 4 * 36 * 12 * 0.95
    )  # most of the 4 x 40 n-grams x 12 layers
    d = detect_synthid(key(0), texts, prompts, params=small, proc=proc)
    assert math.isclose(d.p_value, exact_tail(gs, ws), rel_tol=1e-6)


def exact_tail(gs: torch.Tensor, ws: torch.Tensor) -> float:
    """P(Σ W_i·g_i >= observed) for fair coins g_i, by direct convolution with binomials of
    scipy, one class of equal weights at a time (a reference for the detector's tilted FFT)."""
    score = int((gs * ws).sum())
    pmf = np.ones(1)
    for wv, count in zip(*np.unique(ws.numpy(), return_counts=True)):
        cls = np.zeros(int(wv) * int(count) + 1)
        cls[:: int(wv)] = binom.pmf(np.arange(count + 1), count, 0.5)
        pmf = np.convolve(pmf, cls)
    return float(pmf[score:].sum())


def test_detects_watermarked_sampling_and_not_other_keys():
    """Sampling a fixed random model through the tournament: detected under its key, not others."""
    torch.manual_seed(2)
    table = torch.randn(V, V) * 2.0  # next-token logits by previous token: a toy bigram model
    proc = SynthIDTopK(key(0).hash_key, P)
    seqs, prompts = [], []
    for _ in range(6):
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
    # the exact tail agrees with a direct sum over scipy's binomials (the pairs that share a
    # table index count once each: the weighted tail), down to ~1e-300 where floats end
    gs, ws = synthid_units(processor_for(key(0).hash_key, P), seqs, prompts, P.table_size)
    if own.p_value > 1e-290:
        assert math.isclose(own.p_value, exact_tail(gs, ws), rel_tol=1e-6)
    else:
        assert own.log10_p < -290 and exact_tail(gs, ws) < 1e-280


def test_position_weights():
    assert position_weights(torch.tensor([1.0, 0.5, 0.125])) == [0, 4, 7]


def test_layer_weights_follow_the_fitted_lift():
    """4·lift of layer l at spread s is s·exp(-(0.03 + 0.07(1-s))·(l-1)), in 16 levels; a sure
    position weighs nothing; depth_weights (no teacher) decay by layer only, never to 0."""
    w = layer_weights(torch.tensor([0.0, 0.5, 1.0]), depth=30)
    assert w[0][:3] == [16, round(16 * math.exp(-0.03)), round(16 * math.exp(-0.06))]
    assert w[1][0] == 8 and w[1][29] == round(8 * math.exp(-(0.03 + 0.035) * 29))
    assert w[2] == [0] * 30
    assert all(a >= b for a, b in zip(w[0], w[0][1:]))  # later layers never weigh more
    d = depth_weights(5, depth=30)
    assert (
        len(d) == 5
        and d[0][0] == 8
        and d[0][-1] == max(1, round(8 * math.exp(-0.055 * 29)))
        and min(d[0]) >= 1
    )


def test_units_keep_the_largest_layer_weight_per_index():
    proc = processor_for(key(0).hash_key, P)
    ans = [5, 6, 7, 8, 9, 10]
    per_layer = [
        [i + 1] * P.depth for i in range(len(ans))
    ]  # position i weighs i + 1 in every layer
    g, w = synthid_units(proc, [ans], [[1, 2, 3, 4]], P.table_size, [per_layer])
    g1, w1 = synthid_units(proc, [ans], [[1, 2, 3, 4]], P.table_size)
    assert len(g) == len(g1) and set(w1.tolist()) == {1}
    assert sorted(set(w.tolist())) == list(range(1, len(ans) + 1))
    # one layer weighted 0 everywhere drops its indices from the test
    zero_first = [[0] + [1] * (P.depth - 1) for _ in ans]
    d0 = detect_synthid(key(0), [ans], [[1, 2, 3, 4]], params=P, weights=[zero_first])
    assert d0.scored < len(g1)


def test_layered_null_is_exact_over_many_keys():
    """Key-independent per-layer weights keep the test exact: on texts independent of the key the
    false-positive rate at α = 1e-2 and 5e-2 over 30 texts x 40 keys stays within 3σ of α."""
    g = torch.Generator().manual_seed(4)
    texts = [torch.randint(0, V, (40,), generator=g).tolist() for _ in range(30)]
    prompts = [torch.randint(0, V, (8,), generator=g).tolist() for _ in range(30)]
    weights = [layer_weights(torch.rand(40, generator=g), P.depth) for _ in range(30)]
    ps = []
    for k in range(40):
        proc = processor_for(key(k).hash_key, P)
        ps += [
            detect_synthid(key(k), [t], [pr], params=P, weights=[w], proc=proc).p_value
            for t, pr, w in zip(texts, prompts, weights)
        ]
    n = len(ps)
    for alpha in (1e-2, 5e-2):
        assert sum(p < alpha for p in ps) / n <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n)
    assert sum(p < 0.5 for p in ps) / n > 0.4  # not a test that never fires


def test_params_scheme_synthid_dispatches_detection():
    """WatermarkParams(scheme="synthid") is the one object the server and the detectors share:
    detect_tokens and trace test its keys with the tournament's detector."""
    from distillguard.watermark import detect_tokens, trace

    params = WatermarkParams(scheme="synthid", synthid=P)
    assert params.gamma == 0.5 and params.context_width == P.ngram_len - 1
    k0, k1 = (account_key(SECRET, f"acct-{i}", params) for i in range(2))
    torch.manual_seed(2)
    table = torch.randn(V, V) * 2.0
    proc = SynthIDTopK(k0.hash_key, P)
    ids = torch.randint(0, V, (1, 4))
    prompt = ids[0].tolist()
    for _ in range(80):
        ids = torch.cat(
            [ids, torch.multinomial(proc(ids, table[ids[:, -1]]).softmax(-1), 1)], dim=1
        )
    ans = ids[0, 4:].tolist()
    d = detect_tokens(k0, [ans], prompt_seqs=[prompt], vocab_size=V)
    assert d == detect_synthid(k0, [ans], [prompt], params=P) and d.p_value < 1e-4
    t = trace([k0, k1], [ans], vocab_size=V, prompt_seqs=[prompt])
    assert t.accounts == ["acct-0"]


def test_batched_hashing_is_transformers_own():
    """tournament() hashes rows with different keys in one pass: the same n-gram keys and the
    same result as transformers' own _compute_keys / update_scores, key by key."""
    from distillguard.watermark.synthid import tournament

    torch.manual_seed(5)
    logp = (torch.randn(3, V) * 2).log_softmax(-1)
    ctx = torch.randint(0, V, (3, P.ngram_len - 1))
    procs = [processor_for(key(i).hash_key, P) for i in range(3)]
    got = tournament(procs, P, logp, ctx)
    for b, proc in enumerate(procs):
        top_lp, top_ids = logp[b : b + 1].topk(P.top_k, dim=-1)
        mass = top_lp.logsumexp(dim=-1, keepdim=True)
        g = proc.sample_g_values(proc._compute_keys(ctx[b : b + 1], top_ids)[0])
        want = logp[b : b + 1].scatter(1, top_ids, proc.update_scores(top_lp - mass, g) + mass)
        assert torch.allclose(got[b], want[0], atol=1e-5)
        assert not torch.allclose(got[b], got[(b + 1) % 3], atol=1e-3)
