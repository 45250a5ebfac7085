"""Embedding: add δ to the green logits of each row, per row key (the server batches accounts)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from distillguard.watermark.scheme import WatermarkKey, green_from_state, green_mask, key_states


def apply_watermark(logits: torch.Tensor, contexts: torch.Tensor, keys: list[WatermarkKey | None]) -> torch.Tensor:
    """Bias every watermarked row's green tokens. logits (B, V); contexts (B, h_max), the last
    tokens of each row (left-padded when shorter); keys one per row, None for no watermark."""
    out = logits
    groups: dict[object, list[int]] = {}
    for b, key in enumerate(keys):
        if key is not None and key.params.delta > 0:
            groups.setdefault(key.params, []).append(b)
    for params, rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        ctx = contexts[idx, -params.context_width:]
        hash_keys = [keys[b].hash_key for b in rows]
        vocab = logits.shape[-1]
        if out is logits:
            out = logits.clone()
        if params.scheme == "keyed-hash" and params.candidates < vocab:
            top = logits[idx].topk(params.candidates, dim=-1).indices  # (R, K)
            green = green_from_state(key_states(hash_keys, ctx)[:, None], top, params.gamma)  # (R, K)
            out[idx] = out[idx].scatter_add(1, top, green.to(out.dtype) * params.delta)
        else:
            out[idx] = out[idx] + params.delta * green_mask(params, hash_keys, ctx, vocab).to(out.dtype)
    return out


class WatermarkLogitsProcessor(LogitsProcessor):
    """The same embedding for ``model.generate(logits_processor=[...])`` with one key."""

    def __init__(self, key: WatermarkKey):
        self.key = key

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        contexts = input_ids[:, -self.key.params.context_width:]
        return apply_watermark(scores, contexts, [self.key] * scores.shape[0])
