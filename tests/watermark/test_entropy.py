"""Entropy-aware detection: the per-position statistics and the weighted exact test, on known answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.watermark import (
    WatermarkParams,
    account_key,
    apply_watermark,
    binomial_test,
    detect_tokens,
)
from distillguard.watermark.detect import weighted_binomial_test, weighted_pairs
from distillguard.watermark.entropy import (
    PositionStats,
    detect_with_teacher,
    entropy,
    green_posterior,
    llr_weights,
    max_llr_weight,
    position_stats,
    teacher_stats,
    teacher_weights,
)


def test_entropy_known_answers():
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]]
    )
    assert entropy(logits).tolist() == pytest.approx(
        [math.log(4), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], abs=1e-6
    )


def _exact_posterior(logits, gamma, delta, lists=40_000, seed=0):
    """P(token green | token sampled under the watermark), averaged over random green lists."""
    green = (
        torch.rand(lists, len(logits), generator=torch.Generator().manual_seed(seed)) < gamma
    ).float()
    q = (logits + delta * green).softmax(dim=-1)  # (lists, V)
    return (q * green).mean(0) / q.mean(0), q.mean(0)


def test_green_posterior_limits_and_simulation():
    gamma, delta = 0.25, 2.0
    alpha = math.exp(delta)
    top = gamma * alpha / (gamma * alpha + 1 - gamma)
    # a sure token: γ; a surprising one: γα/(γα+1-γ), the largest possible
    post = green_posterior(
        torch.tensor([1.0, 1e-9]), torch.tensor([1.0, 0.5]), gamma=gamma, delta=delta
    )
    assert post.tolist() == pytest.approx([gamma, top], abs=1e-6)
    assert max_llr_weight(gamma, delta) == pytest.approx(
        math.log(top / (1 - top)) - math.log(gamma / (1 - gamma))
    )
    # two equally likely tokens, exactly: P(x green | x chosen) = γ² + 2γ(1-γ)·α/(α+1); the
    # approximation's worst case (the rest of the distribution is one token, green or not)
    two = green_posterior(torch.tensor([0.5]), torch.tensor([0.5]), gamma=gamma, delta=delta)
    assert float(two) == pytest.approx(
        gamma**2 + 2 * gamma * (1 - gamma) * alpha / (alpha + 1), abs=0.03
    )
    # against a simulation, on peaked and flat distributions
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, 2.0, 4.0):
        logits = torch.randn(30, generator=gen) * scale
        exact, chosen = _exact_posterior(logits, gamma, delta)
        p = logits.softmax(-1)
        approx = green_posterior(p, (p * p).sum().expand(30), gamma=gamma, delta=delta)
        assert (
            float((chosen * (approx - exact).abs()).sum()) < 0.01
        )  # mean error over chosen tokens
    # δ acts through δ/T
    p, c = torch.tensor([0.3, 0.01]), torch.tensor([0.2, 0.1])
    assert torch.allclose(
        green_posterior(p, c, gamma=gamma, delta=1.4, temperature=0.7),
        green_posterior(p, c, gamma=gamma, delta=2.0, temperature=1.0),
    )


def test_position_stats_known_answers():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]])
    s = position_stats(logits, torch.tensor([2, 1]), temperature=1.0)
    assert s.entropy.tolist() == pytest.approx(
        [math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], abs=1e-6
    )
    assert s.nll.tolist() == pytest.approx([math.log(4), math.log(4)], abs=1e-6)
    assert s.token_prob.tolist() == pytest.approx([0.25, 0.25], abs=1e-6)
    assert s.collision.tolist() == pytest.approx([0.25, 0.625], abs=1e-6)
    cold = position_stats(logits, torch.tensor([2, 1]), temperature=0.5)  # p ∝ p^2: 9:1
    assert cold.token_prob.tolist() == pytest.approx([0.25, 0.1], abs=1e-6)
    assert cold.entropy.tolist() == pytest.approx(s.entropy.tolist())  # entropy stays at T=1


def test_llr_weights_known_answers():
    gamma, delta = 0.25, 2.0
    w_max = max_llr_weight(gamma, delta)
    top = gamma * math.exp(delta) / (gamma * math.exp(delta) + 1 - gamma)
    half = 1 / (
        1 + math.exp(-(math.log(gamma / (1 - gamma)) + w_max / 2))
    )  # logit(q) - logit(γ) = w_max / 2
    q = torch.tensor([0.25, 0.1, top, 0.999, half])
    assert llr_weights(q, gamma, levels=4, max_weight=w_max).tolist() == [0, 0, 4, 4, 2]
    with pytest.raises(ConfigError, match="levels"):
        llr_weights(q, gamma, levels=0, max_weight=w_max)


def test_teacher_weights_skip_positions_below_min_entropy():
    stats = PositionStats(
        entropy=torch.tensor([0.2, 3.0, 3.0]),
        nll=torch.zeros(3),
        token_prob=torch.tensor([1e-6, 1e-6, 1.0]),
        collision=torch.tensor([0.9, 0.01, 1.0]),
    )
    gated = WatermarkParams(min_entropy=1.0)
    assert teacher_weights(gated, stats, levels=8) == [0, 8, 0]
    assert teacher_weights(WatermarkParams(min_entropy=0.0), stats, levels=8) == [8, 8, 0]


def test_weighted_binomial_test_known_answers():
    # equal weights: exactly the binomial test
    for w in (1, 3):
        z, p, lp = weighted_binomial_test(7 * w, [w] * 20, 0.25)
        assert (z, p, lp) == pytest.approx(binomial_test(7, 20, 0.25))
    # brute force over all 2^5 outcomes
    ws, g = [1, 2, 3, 1, 5], 0.3
    for score in range(0, 14):
        exact = sum(
            math.prod(g if b else 1 - g for b in bits)
            for bits in itertools.product([0, 1], repeat=5)
            if sum(w * b for w, b in zip(ws, bits)) >= score
        )
        assert weighted_binomial_test(score, ws, g)[1] == pytest.approx(exact, abs=1e-12)
    _, p, lp = weighted_binomial_test(
        3 * 5000, [3] * 5000, 0.25
    )  # underflows as a float, not in log space
    assert p == 0.0 and lp == pytest.approx(5000 * math.log10(0.25))
    assert weighted_binomial_test(0, [], 0.25) == (0.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="positive"):
        weighted_binomial_test(1, [0, 1], 0.25)


def test_weighted_pairs_keep_the_largest_weight_and_drop_zeros():
    ctx, tok, w = weighted_pairs(
        [[1, 2, 3, 1, 2], [1, 2, 9]],
        1,
        prompt_seqs=[[7, 2, 3]],
        weights=[[5, 1, 4, 2, 0], [0, 3, 0]],
    )
    got = {(int(c[0]), int(t)): int(x) for c, t, x in zip(ctx, tok, w)}
    # (1,2) at weights 1 and 3 -> 3; (2,3) is in the prompt; (3,1) -> 2; (2,9) has weight 0
    assert got == {(1, 2): 3, (3, 1): 2}
    with pytest.raises(ConfigError, match="one weight per token"):
        weighted_pairs([[1, 2, 3]], 1, weights=[[1, 1]])


def test_detect_tokens_with_weights():
    params = WatermarkParams(delta=3.0)
    key = account_key(b"k", "a", params)
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 500, (200,), generator=gen).tolist()
    plain = detect_tokens(key, [seq], vocab_size=500)
    assert detect_tokens(key, [seq], vocab_size=500, weights=[[1] * 200]) == plain
    # 0/1 weights: the binomial test on the selected pairs only
    sel = [int(i % 2 == 0) for i in range(200)]
    sub = detect_tokens(key, [seq], vocab_size=500, weights=[sel])
    assert sub.scored < plain.scored and sub.p_value == pytest.approx(
        binomial_test(sub.green, sub.scored, 0.25)[1]
    )


def _bigram_text(key, length, gen, vocab=2000):
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(5))
    seq = [int(torch.randint(0, vocab, (1,), generator=gen))]
    for _ in range(length):
        # entropy varies with the previous token: some steps nearly deterministic, some flat
        logits = base.roll(seq[-1] % 89) * (1 + 6 * (seq[-1] % 3 == 0))
        if key is not None:
            logits = apply_watermark(logits[None, :], torch.tensor([[seq[-1]]]), [key])[0]
        seq.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    return seq


def test_weighted_detection_stays_exact_on_unwatermarked_text():
    """Key-independent weights keep the false-positive rate at or below α across many keys."""
    gen = torch.Generator().manual_seed(11)
    texts = [_bigram_text(None, 60, gen) for _ in range(20)]
    weights = [[(t * 7) % 5 for t in s] for s in texts]  # any function of the text
    keys = [account_key(b"null", f"acct-{i}", WatermarkParams()) for i in range(50)]
    pvals = torch.tensor(
        [
            detect_tokens(k, [s], vocab_size=2000, weights=[w]).p_value
            for k in keys
            for s, w in zip(texts, weights)
        ]
    )
    n = len(pvals)
    for alpha in (0.01, 0.05, 0.2):
        assert float((pvals < alpha).float().mean()) <= alpha + 3 * math.sqrt(
            alpha * (1 - alpha) / n
        )


def test_teacher_stats_match_a_plain_forward_pass():
    from distillguard.models import load_model

    lm = load_model("tiny", device="cpu")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    answers = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (4, 0, 7)]
    stats = teacher_stats(lm.model, prompts, answers, temperature=0.7, batch_size=2)
    assert [len(s.entropy) for s in stats] == [4, 0, 7]
    with torch.inference_mode():
        for p, a, s in zip(prompts, answers, stats):
            if not a:
                continue
            logits = lm.model(input_ids=torch.tensor([p + a])).logits[
                0, len(p) - 1 : -1
            ]  # the rows predicting a
            want = position_stats(logits, torch.tensor(a), temperature=0.7)
            for name in ("entropy", "nll", "token_prob", "collision"):
                assert torch.allclose(getattr(s, name), getattr(want, name), atol=1e-4), name
    with pytest.raises(ConfigError, match="empty prompt"):
        teacher_stats(lm.model, [[]], [[1, 2]])


def _sample(lm, prompt, key, length, gen):
    """Sample from the tiny model (no cache: short texts), watermarked with key or not."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(length):
            logits = lm.model(input_ids=torch.tensor([seq])).logits[:, -1].float()
            if key is not None:
                logits = apply_watermark(logits, torch.tensor([[seq[-1]]]), [key])
            seq.append(int(torch.multinomial((logits / 0.7).softmax(-1)[0], 1, generator=gen)))
    return seq[len(prompt) :]


def test_detect_with_teacher_end_to_end_on_a_tiny_model():
    from distillguard.models import load_model

    lm = load_model("tiny", device="cpu")
    key = account_key(b"k", "acct", WatermarkParams(delta=2.0))
    gen = torch.Generator().manual_seed(2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    marked = [_sample(lm, p, key, 40, gen) for p in prompts]
    clean = [_sample(lm, p, None, 40, gen) for p in prompts]
    hit = detect_with_teacher(
        key, lm.model, prompts, marked, vocab_size=lm.vocab_size, temperature=0.7
    )
    miss = detect_with_teacher(
        key, lm.model, prompts, clean, vocab_size=lm.vocab_size, temperature=0.7
    )
    assert hit.p_value < 1e-3 < miss.p_value
    # the same as detect_tokens with the teacher's weights
    stats = teacher_stats(lm.model, prompts, marked, temperature=0.7)
    weights = [teacher_weights(key.params, s, temperature=0.7) for s in stats]
    assert (
        detect_tokens(key, marked, prompt_seqs=prompts, vocab_size=lm.vocab_size, weights=weights)
        == hit
    )


def test_weights_must_match_the_texts():
    key = account_key(b"k", "a", WatermarkParams())
    with pytest.raises(ConfigError, match="one list per text"):
        detect_tokens(key, [[1, 2, 3], [4, 5]], vocab_size=10, weights=[[1, 1, 1]])


def _direct_log_tail(score, weights, gamma):
    """log P(Σ w_i g_i >= score) by convolving one trial at a time in log space (slow, simple)."""
    import numpy as np
    from scipy.special import logsumexp

    log_dist = np.zeros(1)
    for w in weights:
        new = np.full(len(log_dist) + w, -np.inf)
        new[: len(log_dist)] = log_dist + math.log(1 - gamma)
        new[w:] = np.logaddexp(new[w:], log_dist + math.log(gamma))
        log_dist = new
    return float(logsumexp(log_dist[score:]))


def test_weighted_binomial_test_deep_tails_and_large_inputs():
    """The tilted FFT computation agrees with a direct log-space convolution far in the tail
    (p down to ~1e-80, where a plain convolution in linear space returns 0)."""
    gen = torch.Generator().manual_seed(4)
    for n, gamma in ((150, 0.25), (300, 0.1)):
        ws = torch.randint(1, 9, (n,), generator=gen).tolist()
        total = sum(ws)
        for frac in (0.2, 0.35, 0.6, 0.9):
            score = int(frac * total)
            want = _direct_log_tail(score, ws, gamma) / math.log(10)
            got = weighted_binomial_test(score, ws, gamma)[2]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (n, gamma, score)
    assert weighted_binomial_test(sum(ws) + 1, ws, 0.1)[1] == 0.0


def test_trace_takes_the_same_weights_for_every_key():
    from distillguard.watermark import trace

    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, 300, (80,), generator=gen).tolist() for _ in range(3)]
    weights = [[(t * 5) % 7 for t in s] for s in seqs]
    keys = [account_key(b"t", f"acct-{i}", WatermarkParams()) for i in range(4)]
    result = trace(keys, seqs, vocab_size=300, weights=weights)
    assert result.results == [detect_tokens(k, seqs, vocab_size=300, weights=weights) for k in keys]


@pytest.mark.slow
def test_teacher_llr_false_positive_rate_on_real_sharegpt_answers_across_many_keys():
    """The shipped entropy-aware detector on real ChatGPT answers (never watermarked by us),
    with the real teacher's weights: 100 answers x 60 keys, each answer tested alone. The
    empirical FPR stays within sampling error of α (the full-size check, 1,000 answers, is in
    bench/watermark_quality.py)."""
    from distillguard.data import iter_conversations
    from distillguard.models import load_model

    lm = load_model("smollm2")
    pairs = [
        (c.first_prompt, c.first_answer)
        for c in iter_conversations(400)
        if c.first_prompt and c.first_answer
    ]
    prompts, answers = [], []
    for prompt, answer in pairs:
        ids = lm.tokenizer.encode(answer[:600], add_special_tokens=False)[:48]
        if len(ids) >= 16:
            prompts.append(lm.chat_ids([{"role": "user", "content": prompt[:2000]}])[-96:])
            answers.append(ids)
        if len(answers) == 100:
            break
    assert len(answers) == 100
    params = WatermarkParams()
    stats = teacher_stats(
        lm.model,
        prompts,
        answers,
        temperature=0.7,
        pad_id=lm.tokenizer.pad_token_id or 0,
        batch_size=16,
    )
    weights = [teacher_weights(params, s, temperature=0.7) for s in stats]
    assert sum(map(sum, weights)) > 0
    keys = [account_key(b"fpr-llr", f"acct-{i}", params) for i in range(60)]
    dets = [
        [
            detect_tokens(k, [a], prompt_seqs=[p], vocab_size=lm.vocab_size, weights=[w])
            for a, p, w in zip(answers, prompts, weights)
        ]
        for k in keys
    ]
    pvals = torch.tensor([d.p_value for row in dets for d in row])
    n = len(pvals)
    for alpha in (1e-3, 1e-2, 5e-2):
        fpr = float((pvals < alpha).float().mean())
        assert fpr <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n), (alpha, fpr)
    assert (
        0.3 < float(pvals.median()) < 0.8
    )  # a null distribution, not a trivially conservative test
