"""SynthID-Text tournament sampling (Dathathri et al. 2024, Nature) with per-account keys, and
an exact detector for it.

Embedding uses transformers' ``SynthIDTextWatermarkLogitsProcessor`` for what is hard to get
right (its n-gram hashing, the keyed table of g-values, and ``update_scores``, the tournament
over ``depth`` layers). Three changes, all in :func:`tournament` (which the server's engine,
through :func:`apply_synthid`, and :class:`SynthIDTopK` for ``generate`` both call):

- the tournament runs over the ``top_k`` most likely tokens of each row (g-values of a whole
  batch x 49k vocabulary x 30 layers are ~0.5 GB of int64 per step on a CPU); their total
  probability is kept and the tail is left as it is, so the step stays distortion-free in
  expectation over keys;
- the context is each row's real previous ``ngram_len - 1`` tokens (prompt included), read
  from ``input_ids``, instead of the processor's own state (which starts from zeros), so that
  the detector needs only the text and its prompt;
- rows with different keys (a server batches accounts) are hashed in one pass.

Keys: the account's 40-bit hash key (``scheme.account_key``) is expanded by SplitMix64 into
``depth`` layer keys and, separately, the seed of the g-value table, so every account has its
own table as well as its own layer keys.

Detection. A text's g-values are looked up in the table at indices that depend on the text and
the layer keys only; the table's entries are independent fair coins drawn from the key. So,
under the null hypothesis (text independent of the key), the g-values at *distinct table
indices* are independent Bernoulli(1/2): the detector counts each distinct index once (n-grams
repeated in the text or present in the prompt are skipped first) and the mean score test is an
exact binomial test with γ = 1/2 (``detect.binomial_test``), or the exact weighted test when
the (position, layer) pairs carry key-independent weights: :func:`depth_weights` (later layers
lift E[g] less) and :func:`layer_weights` (the teacher's expected lift of each layer at each
position). No trained detector, and no approximation in the null.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import LogitsProcessor, SynthIDTextWatermarkLogitsProcessor

from distillguard.errors import ConfigError
from distillguard.watermark.detect import (
    Detection,
    binomial_test,
    weight_moments,
    weighted_binomial_test,
)
from distillguard.watermark.scheme import SynthIDParams, WatermarkKey, WatermarkParams, mix64_int


def layer_keys(hash_key: int, params: SynthIDParams) -> tuple[list[int], int]:
    """(depth layer keys, table seed) derived from an account's hash key (SplitMix64 stream)."""
    state = hash_key & ((1 << 64) - 1)
    out = []
    for _ in range(params.depth + 1):
        state = (state + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        out.append(mix64_int(state) >> 4)  # 60 bits: stays a positive int64
    return out[:-1], out[-1]


@functools.lru_cache(maxsize=256)
def processor_for(
    hash_key: int, params: SynthIDParams, device="cpu"
) -> SynthIDTextWatermarkLogitsProcessor:
    """transformers' processor for one account's key (cached: the server keeps one per key; it is
    only read, never updated, here: the context comes from the rows, not its state)."""
    keys, table_seed = layer_keys(hash_key, params)
    return SynthIDTextWatermarkLogitsProcessor(
        ngram_len=params.ngram_len,
        keys=keys,
        sampling_table_size=params.table_size,
        sampling_table_seed=table_seed,
        context_history_size=1024,
        device=device,
    )


class SynthIDTopK(LogitsProcessor):
    """Tournament sampling over the top-k tokens, one key for every row. Put it after the
    temperature warper: the tournament acts on the distribution that is sampled."""

    def __init__(self, hash_key: int, params: SynthIDParams = SynthIDParams()):
        self.params = params
        self.proc = processor_for(hash_key, params)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return tournament(
            [self.proc] * len(scores),
            self.params,
            scores.float().log_softmax(dim=-1),
            input_ids[:, -(self.params.ngram_len - 1) :],
        )


def tournament(
    procs: Sequence[SynthIDTextWatermarkLogitsProcessor],
    params: SynthIDParams,
    logp: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """Log-probabilities after the tournament over each row's top k, row b with the key of
    ``procs[b]`` (one processor, or one per row); the tail keeps its mass.
    logp (B, V) normalised log-probabilities (-inf allowed: filtered tokens stay impossible);
    context (B, ngram_len - 1) the previous tokens -> (B, V).

    The hashing is transformers' (``_compute_keys``: its LCG over the context, the candidate
    and each layer key), written out over the batch so that rows with different keys are
    hashed in one pass (transformers' vmap'd version takes one key set per call: ~3.5 ms per
    row on a CPU); the tournament itself is its ``update_scores``. A test checks that both give
    identical keys."""
    k = min(params.top_k, logp.shape[-1])
    top_lp, top_ids = logp.topk(k, dim=-1)  # (B, k)
    mass = top_lp.logsumexp(dim=-1, keepdim=True)  # log of the top-k's total probability
    h = candidate_hashes(context, top_ids)  # (B, k)
    if all(p is procs[0] for p in procs):
        layer = procs[0].keys[None, None, :]  # (1, 1, depth)
    else:
        layer = torch.stack([p.keys for p in procs])[:, None, :]  # (B, 1, depth)
    idx = table_indices(h, layer, params.table_size)  # (B, k, depth)
    g = torch.stack(
        [torch.take(_small_table(p), idx[b]) for b, p in enumerate(procs)]
    )  # (B, k, depth)
    out = procs[0].update_scores(top_lp - mass, g)  # log probs over the top k, renormalised
    # update_scores turns log 0 into the float minimum; keep impossible tokens at -inf
    out = torch.where(torch.isfinite(top_lp), out + mass, top_lp)
    # the tournament's float32 products can sum to 1 ± 1e-7: no logprob above 0
    return logp.scatter(1, top_ids, out.clamp(max=0.0))


def candidate_hashes(context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The key-independent part of transformers' n-gram hash (its ``accumulate_hash`` LCG over the
    context, then each candidate token): context (B, ngram_len - 1), candidates (B, k) -> (B, k).
    :func:`table_indices` finishes it with the layer keys."""
    h = torch.ones(len(context), dtype=torch.long, device=context.device)
    for j in range(context.shape[1]):  # accumulate_hash over the context
        h = (h + context[:, j]) * _LCG_MUL + 1
    return (h[:, None] + candidates) * _LCG_MUL + 1  # (B, k) with each candidate


def table_indices(hashes: torch.Tensor, layer_keys: torch.Tensor, table_size: int) -> torch.Tensor:
    """The g-value table index of every (n-gram, layer): hashes (...,) from :func:`candidate_hashes`,
    layer_keys (depth,) (or anything that broadcasts against (..., 1)) -> (..., depth)."""
    return ((hashes[..., None] + layer_keys) * _LCG_MUL + 1) % table_size


def _small_table(proc: SynthIDTextWatermarkLogitsProcessor) -> torch.Tensor:
    """The processor's g-value table as uint8 (64 KiB instead of 512: it stays in cache, and the
    per-step lookups of a batch are ~5x faster), made once per processor."""
    table = getattr(proc, "_distillguard_u8", None)
    if table is None:
        table = proc._distillguard_u8 = proc.sampling_table.to(torch.uint8)
    return table


_LCG_MUL = (
    6364136223846793005  # transformers' accumulate_hash multiplier (int64 products wrap, as there)
)


def apply_synthid(
    logp: torch.Tensor, contexts: torch.Tensor, keys: Sequence[WatermarkKey | None]
) -> torch.Tensor:
    """The tournament on every SynthID row of a batch, each with its account's key (one cached
    processor per key, all rows hashed in one pass); other rows are returned bitwise as they
    were. logp (B, V) the log-probabilities each row samples from; contexts (B, h >= ngram_len - 1)
    each row's last tokens (prompt, then answer) -> (B, V)."""
    groups: dict[SynthIDParams, list[int]] = {}
    for b, key in enumerate(keys):
        if key is not None and isinstance(key.params.impl, SynthID):
            groups.setdefault(key.params.synthid, []).append(b)
    if not groups:
        return logp
    out = logp
    for params, rows in groups.items():
        procs = [processor_for(keys[b].hash_key, params, str(logp.device)) for b in rows]
        ctx = contexts[:, contexts.shape[1] - (params.ngram_len - 1) :]
        if len(rows) == len(logp):  # every row: no gather, no scatter
            return tournament(procs, params, logp, ctx)
        idx = torch.tensor(rows, device=logp.device)
        if out is logp:
            out = logp.clone()
        out[idx] = tournament(procs, params, logp[idx], ctx[idx])
    return out


def synthid_units(
    proc: SynthIDTextWatermarkLogitsProcessor,
    answers: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    table_size: int,
    weights: Sequence[Sequence] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct table indices an answer's n-grams (after its prompt's last tokens, when there
    is one prompt per answer) look up,
    with their g-values and weights. Each answer's n-grams are deduplicated across all answers
    and those present in the prompts are skipped. ``weights``: one per answer token, an int (every
    layer alike) or ``depth`` ints (one per layer, :func:`layer_weights`); an n-gram seen twice
    keeps the larger weight of each layer (a repeat is the same evidence), and a table index
    touched by several distinct (n-gram, layer) pairs gets the sum of their weights.

    Why the sum: each such pair is separate evidence (the tournament lifted g at that pair), and
    with many answers the pairs outnumber the table (96 answers x 48 tokens x 30 layers = 138k
    pairs on 65,536 entries), so keeping one weight per index threw most of it away
    (``docs/decisions/synthid-sum-per-index.md``: keeping the largest gave z = 9.8 on 96 watermarked answers,
    less than on 24: 12.8; the sum gives 22.5 and 14.9).
    The test stays exact: the weights depend on the text and the layer keys, not on the table's
    g-values (drawn from the key's own table seed), so under H0 the g of distinct indices are
    independent fair coins whatever the weights. Returns g (N,) and weights (N,) int64."""
    n, depth = proc.ngram_len, len(proc.keys)
    excluded = {tuple(p[i - n + 1 : i + 1]) for p in prompts for i in range(n - 1, len(p))}
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    aligned = len(prompts) == len(answers)
    for b, ans in enumerate(answers):
        seq = (list(prompts[b][-(n - 1) :]) if aligned else []) + list(ans)
        off = len(seq) - len(ans)
        for i in range(len(ans)):
            gram = tuple(seq[off + i - n + 1 : off + i + 1])
            if len(gram) < n or gram in excluded:
                continue
            w = (
                torch.ones(depth, dtype=torch.long)
                if weights is None
                else torch.as_tensor(weights[b][i]).long()
            )
            w = w.expand(depth)
            found = seen.get(gram)
            seen[gram] = w if found is None else torch.maximum(found, w)
    if not seen:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    grams = torch.tensor(list(seen), dtype=torch.long)  # (N, n)
    w = torch.stack(list(seen.values()))  # (N, depth)
    keys = proc.compute_ngram_keys(grams[None])[0] % table_size  # (N, depth) table indices
    uniq, inv = keys.reshape(-1).unique(return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce(
        0, inv, w.reshape(-1), reduce="sum"
    )
    return proc.sampling_table[uniq].long(), total


def detect_synthid(
    key: WatermarkKey,
    answers: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    *,
    params: SynthIDParams | None = None,
    weights: Sequence[Sequence] | None = None,
    proc: SynthIDTextWatermarkLogitsProcessor | None = None,
) -> Detection:
    """Exact test of answers against a SynthID key: S = Σ W_i·g_i over the distinct table indices
    they touch (W_i: the pairs on index i, weighted by ``weights`` when given; see
    :func:`synthid_units`), with the g_i independent fair coins under the null: the exact
    weighted tail, or the binomial tail when every W_i is 1. ``green``/``scored`` count indices.
    ``params``: default the key's own (``key.params.synthid``)."""
    params = params or key.params.synthid
    proc = proc or processor_for(key.hash_key, params)
    g, w = synthid_units(proc, answers, prompts, params.table_size, weights)
    keep = w > 0
    g, w = g[keep], w[keep]
    ones = int(g.sum())
    moments = {}
    if len(w) and int(w.max()) > 1:
        z, p, log10_p = weighted_binomial_test(int((g * w).sum()), w.tolist(), 0.5)
        moments = weight_moments(int((g * w).sum()), w)  # for the power statement
    else:
        z, p, log10_p = binomial_test(ones, len(g), 0.5)
    return Detection(
        key_id=key.key_id,
        account=key.account,
        scored=len(g),
        green=ones,
        gamma=0.5,
        z=z,
        p_value=p,
        log10_p=log10_p,
        **moments,
    )


def position_weights(collision: torch.Tensor, levels: int = 8) -> list[int]:
    """Key-independent weights of answer positions for :func:`detect_synthid`: the first
    tournament layer lifts E[g] by (1 - Σp²)/4, so weight ∝ 1 - Σp² (tempered distribution)."""
    return (levels * (1 - collision.double())).round().clamp(0, levels).long().tolist()


# How fast the g-lift of successive layers decays: each layer concentrates the distribution,
# and a concentrated one leaves the next layers little to tilt. Measured on the teacher's own
# answers to 32 held-out ShareGPT prompts (not the quality bench's), T=0.7, by running the
# tournament on each position's top-256 distribution with random g-values
# (docs/decisions/synthid-layer-weights.md, bench/results/watermark_synthid_layers.json): the lift of
# layer l (1-based) at a position of spread s = 1 - Σp² is close to
#     s/4 · exp(-λ(s)·(l - 1)),   λ(s) = 0.03 + 0.07·(1 - s)
# (layer 1 exact; the fit over 10 bins of s by least squares, weighted by positions). Over all
# positions the mean lift falls from 0.109 (layer 1) to 0.022 (layer 30): ~exp(-0.055·(l-1)).
LAYER_DECAY = (0.03, 0.07)
MEAN_LAYER_DECAY = 0.055


def layer_weights(collision: torch.Tensor, depth: int, levels: int = 16) -> list[list[int]]:
    """Key-independent weights of every (answer position, tournament layer) for
    :func:`detect_synthid`: the quantised expected g-lift ``levels·4·lift`` of that layer under
    the teacher's tempered distribution (``LAYER_DECAY``). The most powerful test of
    Bernoulli(1/2 + l) against Bernoulli(1/2) weights a success by logit(1/2 + l) ≈ 4l for the
    small lifts here (Neyman-Pearson). collision (L,) Σp² per position -> L lists of depth ints."""
    spread = (1 - collision.double()).clamp(0, 1)[:, None]  # (L, 1)
    lam = LAYER_DECAY[0] + LAYER_DECAY[1] * (1 - spread)
    lift4 = spread * torch.exp(
        -lam * torch.arange(depth, dtype=torch.float64)[None, :]
    )  # (L, depth) = 4·lift
    return (levels * lift4).round().clamp(0, levels).long().tolist()


def depth_weights(length: int, depth: int, levels: int = 8) -> list[list[int]]:
    """Weights by layer only, for detection without the teacher: ``levels·exp(-0.055·(l-1))``
    (the mean decay over all positions), the same for every position."""
    row = [
        max(1, round(levels * float(torch.exp(torch.tensor(-MEAN_LAYER_DECAY * i)))))
        for i in range(depth)
    ]
    return [row] * length


# ---- the scheme object -------------------------------------------------------------------------


class SynthID:
    """SynthID-Text as a :class:`~distillguard.watermark.protocol.Scheme`: the tournament on the
    distribution each row samples from, the exact g-value test, layer weights."""

    name: ClassVar[str] = "synthid"
    stage: ClassVar[str] = "logprobs"  # after temperature and top-p: the sampled distribution
    detector_names: ClassVar[tuple[str, str]] = ("layers", "teacher-layers")
    suspect_test: ClassVar[str] = "g-mass-chernoff"

    def unit_space(self, params: WatermarkParams) -> int:
        """How many independent units any test of this scheme can score: the g-value table's
        entries (more text adds weight to them, not units). Optional, outside the protocol:
        the power statement (``watermark/power.py``) uses it to say when no amount of text
        reaches the level."""
        return params.synthid.table_size

    def resolve(self, params: WatermarkParams) -> dict[str, Any]:
        width = params.synthid.ngram_len - 1
        if params.gamma is not None and params.gamma != 0.5:
            raise ConfigError(
                f"watermark gamma={params.gamma} with scheme synthid: its g-values are fair coins, "
                f"so its rate is 1/2; leave gamma unset"
            )
        if params.context_width is not None and params.context_width != width:
            raise ConfigError(
                f"watermark context_width={params.context_width} with scheme synthid: its context "
                f"is synthid.ngram_len - 1 = {width} tokens; leave context_width unset"
            )
        # min_entropy: the tournament is applied at every position (0 keeps that explicit)
        return {
            "gamma": 0.5,
            "context_width": width,
            "min_entropy": 0.0 if params.min_entropy is None else params.min_entropy,
        }

    def embed(self, logp, contexts, keys):
        return apply_synthid(logp, contexts, keys)

    def processor(self, key: WatermarkKey) -> SynthIDTopK:
        return SynthIDTopK(key.hash_key, key.params.synthid)

    def detect(self, key, token_seqs, prompt_seqs, vocab_size, weights, cache=None) -> Detection:
        return detect_synthid(key, token_seqs, prompt_seqs, weights=weights)

    def default_weights(self, params: WatermarkParams, answers) -> list:
        """By layer only (no teacher): :func:`depth_weights`."""
        return [depth_weights(len(a), params.synthid.depth) for a in answers]

    def teacher_weights(self, params, stats, temperature, levels) -> list:
        # 16 levels whatever `levels` (the green lists' default of 8 is too coarse here)
        return layer_weights(stats.collision, params.synthid.depth)

    def suspect_scores(self, params, hash_keys, contexts, top_ids, weights, vocab_size, units):
        """The suspect's expected g mass per key. Key-independent parts first: the n-gram hash of
        every (context, candidate) and its weight per layer, p̄(v | c) x the layer's mean lift
        decay (``MEAN_LAYER_DECAY``: later layers tilt the distribution less).

        Grouped by table index the score Σ w·g is Σ_i W_i·g_i with W_i the total weight on
        index i: the g_i of distinct indices are independent fair coins under H0 (the table is
        drawn from the key's table seed, the indices from its layer keys, as ``synthid_units``
        assumes), and the W_i depend on the suspect, the text and the layer keys, not on the
        table. So the Chernoff bound over the W_i is valid, as for the green lists."""
        sp = params.synthid
        layer_w = torch.exp(-MEAN_LAYER_DECAY * torch.arange(sp.depth, dtype=torch.float64))
        hashes = candidate_hashes(contexts, top_ids)  # (N, k)
        w = weights[:, :, None] * layer_w  # (N, k, depth)
        out = []
        for hash_key in hash_keys:
            # the accounts' processors are cached (as the server caches them); wrong keys are
            # built and dropped
            proc = processor_for(hash_key, sp) if units else processor_for.__wrapped__(hash_key, sp)
            idx = table_indices(hashes, proc.keys, sp.table_size)  # (N, k, depth)
            table = _small_table(proc)
            score = float((torch.take(table, idx).double() * w).sum())
            if not units:
                out.append((score, None, None))
                continue
            unit_w = torch.bincount(idx.flatten(), weights=w.flatten(), minlength=sp.table_size)
            keep = w[:, 0, 0] > 0  # contexts whose top-1 pair is not excluded
            # g of the distinct indices the top-1 n-grams touch
            top1 = torch.take(table, idx[keep, 0, :].unique())
            out.append((score, unit_w[unit_w > 0].numpy(), top1))
        return float(w.sum()), out


__all__ = [
    "LAYER_DECAY",
    "SynthID",
    "SynthIDParams",
    "SynthIDTopK",
    "apply_synthid",
    "candidate_hashes",
    "depth_weights",
    "detect_synthid",
    "layer_keys",
    "layer_weights",
    "position_weights",
    "processor_for",
    "synthid_units",
    "table_indices",
    "tournament",
]
