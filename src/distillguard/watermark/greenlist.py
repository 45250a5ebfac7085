"""The green-list schemes (Kirchenbauer et al. 2023) as :class:`~.protocol.Scheme` objects:
``keyed-hash`` (the default green list) and ``lefthash-ref`` (the reference's LeftHash).

Both add δ to the green logits before temperature, detect by an exact (weighted) binomial test
on distinct (context, token) pairs, and weight positions by the teacher's green posterior
(``entropy.py``). They differ only in how a green list is drawn (``scheme.py`` has both
primitives and says why there are two).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from distillguard.errors import ConfigError
from distillguard.watermark.detect import Detection, pair_test, weighted_pairs
from distillguard.watermark.entropy import (
    PositionStats,
    entropy,
    green_posterior,
    llr_weights,
    max_llr_weight,
)
from distillguard.watermark.processor import WatermarkLogitsProcessor
from distillguard.watermark.scheme import (
    _REFERENCE,
    GREEN_GAMMA,
    KEYED_MIN_ENTROPY,
    WatermarkKey,
    WatermarkParams,
    _signed,
    context_seed,
    green_from_state,
    key_states,
)


class GreenListScheme:
    """What the two green-list schemes share; a subclass draws the green lists."""

    name: ClassVar[str]
    stage: ClassVar[str] = "logits"  # before temperature and top-p, as in the reference
    detector_names: ClassVar[tuple[str, str]] = ("plain", "teacher-llr")
    suspect_test: ClassVar[str] = "green-mass-chernoff"
    default_min_entropy: ClassVar[float] = 0.0

    # ---- green lists (subclasses) ------------------------------------------------------------

    def green_mask(
        self, params: WatermarkParams, hash_keys: list[int], contexts: torch.Tensor, vocab: int
    ) -> torch.Tensor:
        """Green lists of B rows, each with its own key and context. (B, h) -> (B, V) bool."""
        raise NotImplementedError

    def is_green(
        self,
        params: WatermarkParams,
        hash_key: int,
        contexts: torch.Tensor,
        tokens: torch.Tensor,
        vocab: int,
    ) -> torch.Tensor:
        """Whether each (context, token) pair is green under one key. (N, h), (N,) -> (N,) bool"""
        raise NotImplementedError

    def green_topk(
        self,
        params: WatermarkParams,
        hash_keys: Sequence[int],
        contexts: torch.Tensor,
        top_ids: torch.Tensor,
        vocab: int,
    ) -> torch.Tensor:
        """Green bits of each context's candidate tokens under each key. (N, h), (N, k) -> (K, N, k)"""
        raise NotImplementedError

    def _embed_rows(
        self, out: torch.Tensor, idx: torch.Tensor, sub: torch.Tensor, params, hash_keys, ctx
    ) -> None:
        """Add δ to the green logits of rows ``idx`` of ``out`` (a copy); sub = logits[idx]."""
        green = self.green_mask(params, hash_keys, ctx, out.shape[-1])
        out[idx] = out[idx] + params.delta * green.to(out.dtype)

    # ---- the protocol --------------------------------------------------------------------------

    def resolve(self, params: WatermarkParams) -> dict[str, Any]:
        return {
            "gamma": GREEN_GAMMA if params.gamma is None else params.gamma,
            "context_width": 1 if params.context_width is None else params.context_width,
            "min_entropy": (
                self.default_min_entropy if params.min_entropy is None else params.min_entropy
            ),
        }

    def embed(
        self, logits: torch.Tensor, contexts: torch.Tensor, keys: Sequence[WatermarkKey | None]
    ) -> torch.Tensor:
        """Bias every row's green tokens by δ (rows whose entropy is below the scheme's
        ``min_entropy`` are left alone). logits (B, V); contexts (B, h_max)."""
        out = logits
        groups: dict[WatermarkParams, list[int]] = {}
        for b, key in enumerate(keys):
            if key is not None and key.params.delta > 0 and key.params.impl is self:
                groups.setdefault(key.params, []).append(b)
        for params, rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            # (R, V), no copy when every row
            sub = logits if len(rows) == len(logits) else logits[idx]
            if params.min_entropy > 0:
                # Only rows where the teacher is unsure enough; the others stay as they are.
                active = entropy(sub) >= params.min_entropy  # (R,)
                if not bool(active.all()):
                    keep = active.nonzero()[:, 0]
                    idx, sub, rows = idx[keep], sub[keep], [rows[i] for i in keep.tolist()]
                if not rows:
                    continue
            ctx = contexts[idx, -params.context_width :]
            hash_keys = [keys[b].hash_key for b in rows]
            if out is logits:
                out = logits.clone(memory_format=torch.contiguous_format)
            self._embed_rows(out, idx, sub, params, hash_keys, ctx)
        return out

    def processor(self, key: WatermarkKey) -> WatermarkLogitsProcessor:
        return WatermarkLogitsProcessor(key)

    def detect(
        self,
        key: WatermarkKey,
        token_seqs: Sequence[Sequence[int]],
        prompt_seqs: Sequence[Sequence[int]],
        vocab_size: int,
        weights: Sequence[Sequence] | None,
        cache: dict | None = None,
    ) -> Detection:
        width = key.params.context_width
        cache = {} if cache is None else cache
        if ("pairs", width) not in cache:  # the same pairs for every key of this width
            cache["pairs", width] = weighted_pairs(token_seqs, width, prompt_seqs, weights)
        return pair_test(key, *cache["pairs", width], vocab_size)

    def default_weights(self, params: WatermarkParams, answers) -> None:
        return None

    def teacher_weights(
        self, params: WatermarkParams, stats: PositionStats, temperature: float, levels: int
    ) -> list[int]:
        """The quantised LLR weight of each token's green posterior, 0 where the embedder left
        the position alone (entropy below ``min_entropy``)."""
        post = green_posterior(
            stats.token_prob,
            stats.collision,
            gamma=params.gamma,
            delta=params.delta,
            temperature=temperature,
        )
        w = llr_weights(
            post,
            params.gamma,
            levels=levels,
            max_weight=max_llr_weight(params.gamma, params.delta, temperature),
        )
        if params.min_entropy > 0:
            w = torch.where(stats.entropy >= params.min_entropy, w, torch.zeros_like(w))
        return w.tolist()

    def suspect_scores(self, params, hash_keys, contexts, top_ids, weights, vocab_size, units):
        """Green mass Σ w·green per key; the units are the (context, candidate) pairs, each
        green independently with probability γ under the null; the top-1 indicators are Sander
        et al.'s reading mode (each context's top-1 prediction)."""
        green = self.green_topk(params, hash_keys, contexts, top_ids, vocab_size)  # (K, N, k)
        scores = torch.einsum("knj,nj->k", green.double(), weights).numpy()
        total = float(weights.sum())
        if not units:
            return total, [(float(s), None, None) for s in scores]
        top1_keep = weights[:, 0] > 0
        flat = weights.flatten().numpy()
        return total, [
            (float(scores[i]), flat, green[i, :, 0][top1_keep]) for i in range(len(hash_keys))
        ]


class KeyedHash(GreenListScheme):
    """The default green list: a keyed 64-bit hash decides each (context, token) pair
    (``scheme.green_from_state``), vectorised over a batch, on each row's top ``candidates``."""

    name = "keyed-hash"
    default_min_entropy = KEYED_MIN_ENTROPY

    def green_mask(self, params, hash_keys, contexts, vocab):
        states = key_states(hash_keys, contexts)  # (B,)
        ids = torch.arange(vocab, device=contexts.device)
        return green_from_state(states[:, None], ids[None, :], params.gamma)

    def is_green(self, params, hash_key, contexts, tokens, vocab):
        keys = torch.full(tokens.shape, _signed(hash_key), dtype=torch.int64, device=tokens.device)
        return green_from_state(context_seed(keys, contexts), tokens, params.gamma)

    def green_topk(self, params, hash_keys, contexts, top_ids, vocab):
        out = []
        for hk in hash_keys:
            state = context_seed(
                torch.full((len(contexts),), _signed(hk), dtype=torch.int64), contexts
            )  # (N,)
            out.append(green_from_state(state[:, None], top_ids, params.gamma))
        return torch.stack(out)

    def _embed_rows(self, out, idx, sub, params, hash_keys, ctx):
        if params.candidates >= out.shape[-1]:
            return super()._embed_rows(out, idx, sub, params, hash_keys, ctx)
        top = sub.topk(params.candidates, dim=-1).indices  # (R, K)
        green = green_from_state(key_states(hash_keys, ctx)[:, None], top, params.gamma)  # (R, K)
        # in place, touching the R x K candidates only (top ids are distinct within a row)
        out.index_put_(
            (idx[:, None].expand_as(top), top),
            green.to(out.dtype) * params.delta,
            accumulate=True,
        )


class LeftHashRef(GreenListScheme):
    """The reference implementation's LeftHash, exactly: one cached ``randperm`` per (key,
    previous token); context width 1 only."""

    name = "lefthash-ref"

    def resolve(self, params):
        out = super().resolve(params)
        if out["context_width"] != 1:
            raise ConfigError(
                f"context_width={out['context_width']}: lefthash-ref hashes the previous token "
                f"only; leave context_width unset (1) or use scheme keyed-hash"
            )
        return out

    def green_mask(self, params, hash_keys, contexts, vocab):
        rows = [
            _REFERENCE.mask(k, int(c[-1]), vocab, params.gamma)
            for k, c in zip(hash_keys, contexts.tolist())
        ]
        return torch.stack(rows).to(contexts.device)

    def is_green(self, params, hash_key, contexts, tokens, vocab):
        out = torch.zeros(len(tokens), dtype=torch.bool)
        prevs = contexts[:, -1].tolist()
        for i, (prev, tok) in enumerate(zip(prevs, tokens.tolist())):
            out[i] = bool(_REFERENCE.mask(hash_key, prev, vocab, params.gamma)[tok])
        return out

    def green_topk(self, params, hash_keys, contexts, top_ids, vocab):
        # one randperm per (key, previous token), gathered at the top-k ids
        prev, inverse = torch.unique(contexts[:, -1], return_inverse=True)
        out = []
        for hk in hash_keys:
            masks = self.green_mask(params, [hk] * len(prev), prev[:, None], vocab)  # (P, V)
            out.append(masks[inverse].gather(1, top_ids))
        return torch.stack(out)


__all__ = ["GreenListScheme", "KeyedHash", "LeftHashRef"]
