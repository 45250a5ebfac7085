"""Detection math on known answers, and the false-positive rate on text where the truth is known."""

from __future__ import annotations

import math

import pytest
import torch

from distillguard.watermark import (
    WatermarkParams,
    account_key,
    binomial_test,
    detect_tokens,
    holm,
    scored_pairs,
    trace,
)


def test_binomial_test_known_answers():
    z, p, log10_p = binomial_test(
        16, 16, 0.5
    )  # Kirchenbauer et al.: 16 green of 16 at γ=0.5 is z=4
    assert (
        z == pytest.approx(4.0)
        and p == pytest.approx(0.5**16)
        and log10_p == pytest.approx(16 * math.log10(0.5))
    )
    assert binomial_test(0, 0, 0.25) == (0.0, 1.0, 0.0)
    assert binomial_test(0, 10, 0.25)[1] == pytest.approx(1.0)
    _, p, log10_p = binomial_test(5000, 5000, 0.25)  # underflows as a float, not in log space
    assert p == 0.0 and log10_p == pytest.approx(5000 * math.log10(0.25))


def test_holm_known_answers():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_pairs_are_deduplicated_across_texts_and_prompt_ngrams_skipped():
    ctx, tok = scored_pairs([[1, 2, 3, 1, 2], [1, 2, 9]], width=1, prompt_seqs=[[7, 2, 3]])
    pairs = {(int(c[0]), int(t)) for c, t in zip(ctx, tok)}
    assert pairs == {(1, 2), (3, 1), (2, 9)}  # (1,2) once; (2,3) is in the prompt
    ctx2, tok2 = scored_pairs([[1, 2, 3, 4]], width=2)
    assert ctx2.tolist() == [[1, 2], [2, 3]] and tok2.tolist() == [3, 4]


def _sample_text(key, length, gen, vocab=5000):
    """Tokens drawn from a fixed random bigram model with the watermark applied (key) or not (None)."""
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(99))
    seq = [int(torch.randint(0, vocab, (1,), generator=gen))]
    for _ in range(length):
        logits = base.roll(seq[-1] % 97)[None, :] * 2
        if key is not None:
            from distillguard.watermark import apply_watermark

            logits = apply_watermark(logits, torch.tensor([[seq[-1]]]), [key])
        seq.append(int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen)))
    return seq


def test_watermarked_text_is_detected_and_traced_to_its_account():
    params = WatermarkParams(delta=3.0)
    keys = [account_key(b"master", f"acct-{i}", params) for i in range(20)]
    gen = torch.Generator().manual_seed(1)
    leaked = [_sample_text(keys[3], 150, gen) for _ in range(3)] + [
        _sample_text(keys[11], 150, gen) for _ in range(3)
    ]
    clean = [_sample_text(None, 150, gen) for _ in range(6)]
    assert detect_tokens(keys[3], leaked[:3], vocab_size=5000).p_value < 1e-6
    assert detect_tokens(keys[3], clean, vocab_size=5000).p_value > 1e-3
    result = trace(keys, leaked + clean, vocab_size=5000, alpha=1e-3)
    assert sorted(result.accounts) == ["acct-11", "acct-3"]  # the two leakers, and no other


@pytest.mark.slow
def test_false_positive_rate_on_real_unwatermarked_text_across_many_keys():
    """Real ChatGPT answers from ShareGPT (never watermarked by us), 1,000 texts x 20 keys, each
    text tested alone: the empirical FPR at α stays within sampling error of α (the test is exact
    and, being discrete, conservative)."""
    from distillguard.data import iter_conversations
    from distillguard.models import load_model

    tok = load_model("smollm2").tokenizer
    answers = [c.first_answer for c in iter_conversations(3000) if c.first_answer][:1000]
    seqs = [tok.encode(a[:2000], add_special_tokens=False) for a in answers]
    assert len(seqs) == 1000
    params = WatermarkParams()
    keys = [account_key(b"fpr-check", f"acct-{i}", params) for i in range(20)]
    pvals = torch.tensor(
        [detect_tokens(k, [s], vocab_size=49152).p_value for k in keys for s in seqs]
    )
    n = len(pvals)
    for alpha in (1e-3, 1e-2, 5e-2):
        fpr = float((pvals < alpha).float().mean())
        assert fpr <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n), (alpha, fpr)
    # And not trivially conservative: the p-values do vary like a null distribution's.
    assert 0.3 < float(pvals.median()) < 0.8
