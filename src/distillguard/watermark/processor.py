"""Embedding: add δ to the green logits of each row, per row key (the server batches accounts)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from distillguard.watermark.entropy import entropy
from distillguard.watermark.scheme import WatermarkKey, green_from_state, green_mask, key_states


def apply_watermark(
    logits: torch.Tensor, contexts: torch.Tensor, keys: list[WatermarkKey | None]
) -> torch.Tensor:
    """Bias every watermarked row's green tokens by δ (rows whose entropy is below the scheme's
    ``min_entropy`` are left alone). logits (B, V); contexts (B, h_max), the last tokens of each
    row (left-padded when shorter); keys one per row, None for no watermark."""
    out = logits
    vocab = logits.shape[-1]
    groups: dict[object, list[int]] = {}
    for b, key in enumerate(keys):
        if (
            key is not None and key.params.delta > 0 and key.params.scheme != "synthid"
        ):  # synthid: apply_synthid
            groups.setdefault(key.params, []).append(b)
    for params, rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        sub = logits if len(rows) == len(logits) else logits[idx]  # (R, V), no copy when every row
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
        if params.scheme == "keyed-hash" and params.candidates < vocab:
            top = sub.topk(params.candidates, dim=-1).indices  # (R, K)
            green = green_from_state(
                key_states(hash_keys, ctx)[:, None], top, params.gamma
            )  # (R, K)
            # in place, touching the R x K candidates only (top ids are distinct within a row)
            out.index_put_(
                (idx[:, None].expand_as(top), top),
                green.to(out.dtype) * params.delta,
                accumulate=True,
            )
        else:
            out[idx] = out[idx] + params.delta * green_mask(params, hash_keys, ctx, vocab).to(
                out.dtype
            )
    return out


class WatermarkLogitsProcessor(LogitsProcessor):
    """The same embedding for ``model.generate(logits_processor=[...])`` with one key."""

    def __init__(self, key: WatermarkKey):
        self.key = key

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        contexts = input_ids[:, -self.key.params.context_width :]
        return apply_watermark(scores, contexts, [self.key] * scores.shape[0])
