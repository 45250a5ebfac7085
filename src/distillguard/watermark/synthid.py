"""SynthID-Text tournament sampling (Dathathri et al. 2024, Nature) with per-account keys, and
an exact detector for it.

Embedding uses transformers' ``SynthIDTextWatermarkLogitsProcessor`` for what is hard to get
right (its n-gram hashing, the keyed table of g-values, and ``update_scores``, the tournament
over ``depth`` layers). Two changes, both in :class:`SynthIDTopK`:

- the tournament runs over the ``top_k`` most likely tokens of each row (g-values of a whole
  batch x 49k vocabulary x 30 layers are ~0.5 GB of int64 per step on a CPU); their total
  probability is kept and the tail is left as it is, so the step stays distortion-free in
  expectation over keys;
- the context is each row's real previous ``ngram_len - 1`` tokens (prompt included), read
  from ``input_ids``, instead of the processor's own state (which starts from zeros), so that
  the detector needs only the text and its prompt.

Keys: the account's 40-bit hash key (``scheme.account_key``) is expanded by SplitMix64 into
``depth`` layer keys and, separately, the seed of the g-value table, so every account has its
own table as well as its own layer keys.

Detection. A text's g-values are looked up in the table at indices that depend on the text and
the layer keys only; the table's entries are independent fair coins drawn from the key. So,
under the null hypothesis (text independent of the key), the g-values at *distinct table
indices* are independent Bernoulli(1/2): the detector counts each distinct index once (n-grams
repeated in the text or present in the prompt are skipped first) and the mean score test is an
exact binomial test with γ = 1/2 (``detect.binomial_test``), or the exact weighted test when
positions carry key-independent weights (the teacher's view of how much the tournament could
move the choice). No trained detector, and no approximation in the null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, SynthIDTextWatermarkLogitsProcessor

from distillguard.errors import ConfigError
from distillguard.watermark.detect import Detection, binomial_test, weighted_binomial_test
from distillguard.watermark.scheme import WatermarkKey, mix64_int


@dataclass(frozen=True)
class SynthIDParams:
    depth: int = 30  # tournament layers (g-functions)
    ngram_len: int = 5  # context = the previous ngram_len - 1 tokens
    top_k: int = 256  # the tournament runs over each row's top_k tokens (the tail keeps its mass)
    table_size: int = 1 << 16  # entries of the keyed g-value table

    def __post_init__(self) -> None:
        if self.depth < 1 or self.ngram_len < 2 or self.top_k < 2 or self.table_size < 2:
            raise ConfigError(f"bad SynthID parameters {self}: depth >= 1, ngram_len >= 2, top_k >= 2, table_size >= 2")


def layer_keys(hash_key: int, params: SynthIDParams) -> tuple[list[int], int]:
    """(depth layer keys, table seed) derived from an account's hash key (SplitMix64 stream)."""
    state = hash_key & ((1 << 64) - 1)
    out = []
    for _ in range(params.depth + 1):
        state = (state + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        out.append(mix64_int(state) >> 4)  # 60 bits: stays a positive int64
    return out[:-1], out[-1]


def processor_for(hash_key: int, params: SynthIDParams, device="cpu") -> SynthIDTextWatermarkLogitsProcessor:
    keys, table_seed = layer_keys(hash_key, params)
    return SynthIDTextWatermarkLogitsProcessor(
        ngram_len=params.ngram_len, keys=keys, sampling_table_size=params.table_size,
        sampling_table_seed=table_seed, context_history_size=1024, device=device)


class SynthIDTopK(LogitsProcessor):
    """Tournament sampling over the top-k tokens, one key for every row. Put it after the
    temperature warper: the tournament acts on the distribution that is sampled."""

    def __init__(self, hash_key: int, params: SynthIDParams = SynthIDParams()):
        self.params = params
        self.proc = processor_for(hash_key, params)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.params.top_k, scores.shape[-1])
        logp = scores.float().log_softmax(dim=-1)
        top_lp, top_ids = logp.topk(k, dim=-1)  # (B, k)
        mass = top_lp.logsumexp(dim=-1, keepdim=True)  # log of the top-k's total probability
        context = input_ids[:, -(self.params.ngram_len - 1):]
        ngram_keys, _ = self.proc._compute_keys(context, top_ids)  # (B, k, depth)
        g = self.proc.sample_g_values(ngram_keys)
        tournament = self.proc.update_scores(top_lp - mass, g)  # log probs over the top k, renormalised
        return logp.scatter(1, top_ids, tournament + mass)


def synthid_units(proc: SynthIDTextWatermarkLogitsProcessor, answers: Sequence[Sequence[int]],
                  prompts: Sequence[Sequence[int]], table_size: int,
                  weights: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct table indices an answer's n-grams (after its prompt's last tokens) look up,
    with their g-values and weights (largest weight when an index is hit twice). Each answer's
    n-grams are deduplicated across all answers and those present in the prompts are skipped.
    Returns g (N,) and weights (N,) int64."""
    n = proc.ngram_len
    excluded = {tuple(p[i - n + 1:i + 1]) for p in prompts for i in range(n - 1, len(p))}
    seen: dict[tuple[int, ...], int] = {}
    for b, (ans, prm) in enumerate(zip(answers, prompts)):
        seq = list(prm[-(n - 1):]) + list(ans)
        off = len(seq) - len(ans)
        for i in range(len(ans)):
            gram = tuple(seq[off + i - n + 1: off + i + 1])
            if len(gram) < n or gram in excluded:
                continue
            w = 1 if weights is None else int(weights[b][i])
            if w > seen.get(gram, 0):
                seen[gram] = w
    if not seen:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    grams = torch.tensor(list(seen), dtype=torch.long)  # (N, n)
    w = torch.tensor(list(seen.values()), dtype=torch.long)
    keys = proc.compute_ngram_keys(grams[None])[0] % table_size  # (N, depth) table indices
    idx = keys.reshape(-1)
    wide = w[:, None].expand_as(keys).reshape(-1)
    uniq, inv = idx.unique(return_inverse=True)
    best = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce(0, inv, wide, reduce="amax")
    return proc.sampling_table[uniq].long(), best


def detect_synthid(key: WatermarkKey, answers: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], *,
                   params: SynthIDParams = SynthIDParams(), weights: Sequence[Sequence[int]] | None = None,
                   proc: SynthIDTextWatermarkLogitsProcessor | None = None) -> Detection:
    """Exact test of answers against a SynthID key: the number of g = 1 among the distinct table
    indices they touch is Binomial(N, 1/2) under the null (weighted: the exact weighted test)."""
    proc = proc or processor_for(key.hash_key, params)
    g, w = synthid_units(proc, answers, prompts, params.table_size, weights)
    if weights is not None:
        keep = w > 0
        g, w = g[keep], w[keep]
    ones = int(g.sum())
    if weights is not None and len(w) and int(w.max()) > 1:
        z, p, log10_p = weighted_binomial_test(int((g * w).sum()), w.tolist(), 0.5)
    else:
        z, p, log10_p = binomial_test(ones, len(g), 0.5)
    return Detection(key_id=key.key_id, account=key.account, scored=len(g), green=ones, gamma=0.5,
                     z=z, p_value=p, log10_p=log10_p)


def position_weights(collision: torch.Tensor, levels: int = 8) -> list[int]:
    """Key-independent weights of answer positions for :func:`detect_synthid`: the first
    tournament layer lifts E[g] by (1 - Σp²)/4, so weight ∝ 1 - Σp² (tempered distribution)."""
    return (levels * (1 - collision.double())).round().clamp(0, levels).long().tolist()


__all__ = ["SynthIDParams", "SynthIDTopK", "detect_synthid", "layer_keys", "position_weights", "processor_for",
           "synthid_units"]
