"""Embedding: every watermarked row of a batch through its key's scheme (the server batches
accounts, and accounts may use different schemes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from distillguard.watermark.scheme import WatermarkKey


def apply_watermark(
    x: torch.Tensor,
    contexts: torch.Tensor,
    keys: Sequence[WatermarkKey | None],
    stage: str = "logits",
) -> torch.Tensor:
    """Watermark each row whose key's scheme embeds at ``stage``: "logits" (raw logits, before
    temperature and top-p: the green lists) or "logprobs" (the log-probabilities each row
    samples from: SynthID's tournament). Other rows come back bitwise as they were, and ``x``
    itself when no row is watermarked. x (B, V); contexts (B, h_max), the last tokens of each
    row (left-padded when shorter); keys one per row, None for no watermark."""
    schemes = []
    for key in keys:
        if key is not None:
            impl = key.params.impl
            if impl.stage == stage and impl not in schemes:
                schemes.append(impl)
    for impl in schemes:  # each scheme touches its own rows only
        x = impl.embed(x, contexts, keys)
    return x


class WatermarkLogitsProcessor(LogitsProcessor):
    """The green-list embedding for ``model.generate(logits_processor=[...])`` with one key
    (a scheme's own processor: ``key.params.impl.processor(key)``)."""

    def __init__(self, key: WatermarkKey):
        self.key = key

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        contexts = input_ids[:, -self.key.params.context_width :]
        return apply_watermark(scores, contexts, [self.key] * scores.shape[0])
