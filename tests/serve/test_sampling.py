"""Per-row sampling math on tiny tensors with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distillguard.serve.sampling import (
    apply_penalties,
    apply_temperature,
    apply_top_p,
    sample_rows,
    sampling_logprobs,
)

# One distribution, probabilities 0.5, 0.3, 0.15, 0.05, stored out of rank order so the
# functions must map their sorted view back to the original positions.
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != -math.inf}


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.0, {1}),  # only the top token, always kept
        (0.4, {1}),  # the top token alone reaches 0.4
        (0.6, {1, 3}),  # 0.5 is not enough: add the 0.3 token
        (0.75, {1, 3}),
        (0.9, {1, 3, 0}),
        (0.99, {1, 3, 0, 2}),
        (1.0, {1, 3, 0, 2}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    out = apply_top_p(LOGITS[None, :], torch.tensor([top_p]))[0]
    assert kept(out) == expected
    for i in expected:  # kept tokens keep their logits
        assert out[i] == LOGITS[i]


def test_top_p_is_per_row():
    logits = torch.stack([LOGITS, LOGITS, LOGITS])  # (3, V)
    out = apply_top_p(logits, torch.tensor([0.6, 1.0, 0.3]))
    assert [kept(row) for row in out] == [{1, 3}, {0, 1, 2, 3}, {1}]


def test_top_p_candidate_path_matches_full_sort():
    """Vocabularies larger than the ranked candidates: peaked rows take the top-k path, flat rows
    (nucleus outside the candidates) the full sort; both must equal sorting every row."""
    from distillguard.serve.sampling import TOP_P_CANDIDATES, _top_p_sorted

    gen = torch.Generator().manual_seed(0)
    vocab = 4 * TOP_P_CANDIDATES
    scale = torch.tensor([8.0, 4.0, 1.0, 0.01, 8.0, 2.0])[:, None]  # peaked ... almost uniform
    logits = torch.randn(6, vocab, generator=gen) * scale
    top_p = torch.tensor([0.9, 0.95, 0.5, 0.9, 1.0, 0.999])
    out = apply_top_p(logits, top_p)
    expected = logits.clone()
    rows = top_p < 1
    expected[rows] = _top_p_sorted(logits[rows], top_p[rows])
    assert torch.equal(out, expected)
    assert (
        kept(out[3]) and len(kept(out[3])) > TOP_P_CANDIDATES
    )  # the flat row needed the full sort
    assert len(kept(out[0])) < TOP_P_CANDIDATES


def test_temperature_divides_each_row_and_leaves_greedy_rows():
    # Sampled rows are shifted to a maximum of 0 before the division (softmax ignores it).
    logits = torch.tensor([[1.0, 2.0, -4.0], [1.0, 2.0, -4.0], [1.0, 2.0, -4.0]])
    out = apply_temperature(logits, torch.tensor([2.0, 0.0, 0.5]))
    assert out.tolist() == [[-0.5, 0.0, -3.0], [1.0, 2.0, -4.0], [-2.0, 0.0, -12.0]]
    assert torch.allclose(out.log_softmax(-1)[0], (logits[0] / 2).log_softmax(-1))


@pytest.mark.parametrize("t", [1e-38, 1e-45, 1e-30, 5e-324])
def test_a_tiny_temperature_is_the_greedy_limit_not_nan(t):
    # 1e-38 overflowed float32 (logits / t = inf, then inf - inf = NaN): a 500 for its batch.
    logits = torch.tensor([[5.0, 10.0, -3.0, 9.99], [1.0, 2.0, 3.0, 4.0]])
    temperature = torch.tensor([t, 1.0])
    lp = sampling_logprobs(logits, temperature, torch.tensor([1.0, 0.9]))
    assert not lp.isnan().any()
    assert lp[0].argmax() == 1
    if temperature[0] > 0:  # 5e-324 is 0 in float32: a greedy row, reported untempered
        assert lp[0, 1] == 0.0  # all the mass on the largest logit
    assert torch.allclose(
        lp[1], sampling_logprobs(logits[1:], torch.tensor([1.0]), torch.tensor([0.9]))[0]
    )
    gen = torch.Generator().manual_seed(0)
    assert sample_rows(lp, temperature, [gen, torch.Generator().manual_seed(1)])[0] == 1


def test_penalties_follow_openai_formula():
    # l - frequency * count - presence * [count > 0], each row with its own pair.
    logits = torch.zeros(2, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 1.0]])
    out = apply_penalties(
        logits, counts, presence=torch.tensor([0.5, -1.0]), frequency=torch.tensor([0.25, 0.0])
    )
    assert out.tolist() == [[0.0, -0.75, -1.25], [1.0, 0.0, 1.0]]


def test_sampling_logprobs():
    logits = torch.stack([LOGITS * 2, LOGITS * 2, LOGITS * 2])
    out = sampling_logprobs(
        logits, temperature=torch.tensor([2.0, 2.0, 0.0]), top_p=torch.tensor([1.0, 0.6, 0.6])
    )
    # Temperature 2 undoes the doubling: the original distribution.
    torch.testing.assert_close(out[0].exp(), PROBS)
    # Top-p 0.6 keeps {1, 3} (0.5 and 0.3), renormalised to 5/8 and 3/8.
    assert kept(out[1]) == {1, 3}
    torch.testing.assert_close(out[1, [1, 3]].exp(), torch.tensor([5 / 8, 3 / 8]))
    # A greedy row reports the untempered, unfiltered distribution.
    torch.testing.assert_close(out[2], (LOGITS * 2).log_softmax(-1))


def test_greedy_rows_take_the_argmax():
    logprobs = torch.stack([LOGITS, LOGITS])
    out = sample_rows(logprobs, torch.tensor([0.0, 0.0]), generators(0, 1))
    assert out.tolist() == [1, 1]


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logprobs = LOGITS.log_softmax(-1)
    temp = torch.tensor([1.0, 1.0])

    def draws(batch_seeds: tuple[int, ...], steps: int = 50) -> list[list[int]]:
        gens = generators(*batch_seeds)
        batch = logprobs.expand(len(batch_seeds), -1)
        return [sample_rows(batch, temp[: len(batch_seeds)], gens).tolist() for _ in range(steps)]

    alone = [d[0] for d in draws((7,))]
    with_neighbour = [d[0] for d in draws((7, 8))]
    assert alone == with_neighbour  # row 0's draws do not depend on row 1
    assert [d[0] for d in draws((7,))] == alone  # same seed, same draws
    assert [d[0] for d in draws((9,))] != alone  # another seed, other draws
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_samples_follow_the_filtered_distribution():
    logprobs = sampling_logprobs(LOGITS[None, :], torch.tensor([1.0]), torch.tensor([0.6]))
    gen = generators(0)
    draws = [int(sample_rows(logprobs, torch.tensor([1.0]), gen)[0]) for _ in range(2000)]
    assert set(draws) == {1, 3}  # filtered tokens never come out
    assert draws.count(1) / len(draws) == pytest.approx(5 / 8, abs=0.05)
