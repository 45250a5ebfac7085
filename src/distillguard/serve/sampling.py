"""Per-row sampling math for a batch whose rows each carry their own parameters.

transformers' ``LogitsProcessor``s take one scalar per batch (one temperature, one top-p);
a server batching unrelated requests needs a value per row, hence these small functions.
All take ``logits`` of shape (B, V) and per-row parameter tensors of shape (B,).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# Tokens ranked before falling back to a full sort in apply_top_p.
TOP_P_CANDIDATES = 1024


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's presence/frequency penalties: ``l - f·count - p·[count>0]``; counts (B, V)."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature 0 (greedy) are left as they are.

    Sampled rows are shifted to a maximum of 0 first (softmax does not see the shift): a tiny
    temperature (1e-38 is a valid request) then sends the other tokens to -inf, which is the
    limit it means, instead of overflowing float32 to +inf, whose inf - inf is NaN in the
    softmax of every row sampled with it (a 500 for the whole batch, all accounts).
    """
    sampled = temperature > 0
    t = torch.where(sampled, temperature, torch.ones_like(temperature))
    shift = torch.where(
        sampled[:, None], logits.amax(dim=-1, keepdim=True), torch.zeros_like(logits[:, :1])
    )
    return (logits - shift) / t[:, None]


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering per row: keep the smallest set of tokens whose mass reaches ``top_p``.

    A token is dropped when the mass of the tokens ranked strictly above it already reaches
    ``top_p``; the top token is always kept. Rows with ``top_p >= 1`` are untouched.

    Sorting a whole row is the slow part (about a quarter of a decoding step of a 135M model
    with a 49k vocabulary at 16 rows), yet nuclei are usually small: the top
    ``TOP_P_CANDIDATES`` tokens are ranked first, and only the rows whose nucleus they do not
    hold are sorted in full.
    """
    out = logits.clone()
    rows = (top_p < 1).nonzero()[:, 0]  # rows to filter
    if not len(rows):
        return out
    x, p = logits[rows], top_p[rows]
    k = TOP_P_CANDIDATES
    if k < x.shape[-1]:
        vals, order = x.topk(k, dim=-1)  # (R, k), ranked like a descending sort
        probs = (vals - x.logsumexp(dim=-1, keepdim=True)).exp()
        # Every token past the k-th has at least the candidates' mass above it: dropped when
        # that mass reaches p (with a margin for rounding; borderline rows take the full sort).
        inside = probs.sum(dim=-1) >= p + 1e-4
        if bool(inside.any()):
            v, o, pp, pr = vals[inside], order[inside], p[inside], probs[inside]
            drop = (pr.cumsum(dim=-1) - pr) >= pp[:, None]
            drop[:, 0] = False
            out[rows[inside]] = torch.full_like(x[inside], NEG_INF).scatter_(
                -1, o, v.masked_fill(drop, NEG_INF)
            )
        rows, x, p = rows[~inside], x[~inside], p[~inside]
        if not len(rows):
            return out
    out[rows] = _top_p_sorted(x, p)
    return out


def _top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """:func:`apply_top_p` by sorting every row in full; all rows have ``top_p < 1``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (B, V) mass of tokens ranked above each
    drop = mass_above >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sampling_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the distribution each row actually samples from, (B, V).

    Greedy rows (temperature 0) report the untempered distribution, whose argmax they take.
    """
    scaled = apply_temperature(logits.float(), temperature)
    sampled = temperature > 0
    if bool(sampled.any()):
        filtered = apply_top_p(scaled, top_p)
        scaled = torch.where(sampled[:, None], filtered, scaled)
    return scaled.log_softmax(dim=-1)


def sample_rows(
    logprobs: torch.Tensor, temperature: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """Draw one token per row, each row from its own generator (so a seed fixes that row alone)."""
    greedy = logprobs.argmax(dim=-1)  # (B,)
    probs = logprobs.exp()
    out = greedy.clone()
    for i, gen in enumerate(generators):
        if float(temperature[i]) > 0:
            out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out
