"""The vLLM plugin's batch: which row holds which watermarked request, and one step over the
batch's logits. Free of vLLM (it reads ``BatchUpdate``'s fields by name) so that the main
environment can test it against the engine as well as vLLM's.

A step does for the keyed rows exactly what our engine's ``RowEmission._choose`` does before
it draws (serve/emission.py): presence/frequency penalties over the row's own output, the
green-list bias on the logits, temperature and top-p (``sampling_logprobs``), SynthID's
tournament on that distribution, with the same functions on the same inputs, so the
log-probabilities a keyed row samples from are the engine's, bit for bit
(tests/integrations/test_rows.py). The rows are handled together: one gather, the schemes'
own batched ``embed``, one scatter. Rows without key material come back untouched, and a
batch without any keyed row costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from distillguard.serve.keymaterial import XARG, Sampler, decode
from distillguard.serve.sampling import apply_penalties, sampling_logprobs
from distillguard.watermark import WatermarkKey, apply_watermark


@dataclass
class KeyedRow:
    key: WatermarkKey
    sampler: Sampler
    prompt: Sequence[int]
    # vLLM's live list of the request's output tokens (the same object, so it grows as the
    # request decodes: BatchUpdate's documented contract)
    output: list[int]


def material(params) -> object | None:
    """A request's key material from its SamplingParams (None: not watermarked)."""
    extra = getattr(params, "extra_args", None)
    return extra.get(XARG) if extra else None


class WatermarkRows:
    def __init__(self) -> None:
        self.rows: dict[int, KeyedRow] = {}

    def update(
        self, removed: Iterable[int], added: Iterable[tuple], moved: Iterable[tuple]
    ) -> None:
        """Apply one BatchUpdate, in the order vLLM prescribes: removed, added, moved."""
        for index in removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in added:
            raw = material(params)
            if raw is None:
                self.rows.pop(index, None)  # an added request replaces whatever held the index
                continue
            key, sampler = decode(raw)
            self.rows[index] = KeyedRow(key, sampler, prompt or (), output)
        for a, b, direction in moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if getattr(direction, "name", direction) == "SWAP" and rb is not None:
                self.rows[a] = rb

    def contexts(self, rows: list[KeyedRow], width: int, device) -> torch.Tensor:
        """The last ``width`` tokens (prompt, then output) of each row, left-padded with 0: the
        engine's ``RowEmission._contexts``. (R, width)"""
        out = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            tail = row.output[-width:]
            if len(tail) < width:
                tail = (list(row.prompt) + list(row.output))[-width:]
            if tail:
                out[r, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
        return out.to(device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The step on vLLM's (B, V) float32 logits, in place on the keyed rows: each becomes the
        log-probabilities the engine would sample that row from."""
        if not self.rows:
            return logits
        order = sorted(i for i in self.rows if i < len(logits))
        if not order:
            return logits
        rows = [self.rows[i] for i in order]
        dev = logits.device
        idx = torch.tensor(order, device=dev)
        x = logits[idx].float()  # a copy
        samplers = [r.sampler for r in rows]
        if any(s.presence_penalty or s.frequency_penalty for s in samplers):
            counts = torch.zeros_like(x)
            for r, row in enumerate(rows):
                if row.output:
                    out = torch.tensor(row.output, device=dev)
                    counts[r].index_add_(0, out, torch.ones(len(out), device=dev))
            x = apply_penalties(
                x,
                counts,
                torch.tensor([s.presence_penalty for s in samplers], device=dev),
                torch.tensor([s.frequency_penalty for s in samplers], device=dev),
            )
        keys = [r.key for r in rows]
        width = max(k.params.context_width for k in keys)
        ctx = self.contexts(rows, width, dev)
        x = apply_watermark(x, ctx, keys)  # the green lists, before temperature
        temperature = torch.tensor([s.temperature for s in samplers], device=dev)
        top_p = torch.tensor([s.top_p for s in samplers], device=dev)
        logprobs = sampling_logprobs(x, temperature, top_p)
        logprobs = apply_watermark(logprobs, ctx, keys, "logprobs")  # SynthID's tournament
        logits[idx] = logprobs.to(logits.dtype)
        return logits


__all__ = ["KeyedRow", "WatermarkRows", "material"]
