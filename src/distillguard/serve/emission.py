"""The engine's last step for every row: choose its next token from its own processed
distribution (logit bias, penalties, antidistillation, watermark, temperature, top-p) and stream
the new text, logprobs and finish events to its job.

A mixin of :class:`distillguard.serve.engine.Engine`, apart so each file reads as one concern;
it uses the engine's model (``lm``), token tables (``_token_text``, ``_token_bytes``,
``_special``), ``antidistill`` and the hidden-state tap ``_tap``.
"""

from __future__ import annotations

import torch

from distillguard.serve.antidistill import apply_antidistill
from distillguard.serve.jobs import Event, Row
from distillguard.serve.sampling import apply_penalties, sample_rows, sampling_logprobs
from distillguard.watermark import apply_watermark

# JSON has no -inf; OpenAI reports impossible tokens with this value.
LOGPROB_FLOOR = -9999.0


class RowEmission:
    def _choose(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample the next token of every row from its own processed distribution. logits (B, V)."""
        dev = logits.device
        logits = logits.float()
        params = [r.job.params for r in rows]
        if any(p.logit_bias for p in params):
            bias = torch.zeros_like(logits)
            for b, p in enumerate(params):
                for tok, value in p.logit_bias:
                    bias[b, tok] = value
            logits = logits + bias
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = torch.zeros_like(logits)
            for b, r in enumerate(rows):
                if r.out_ids:
                    counts[b].index_add_(
                        0,
                        torch.tensor(r.out_ids, device=dev),
                        torch.ones(len(r.out_ids), device=dev),
                    )
            logits = apply_penalties(
                logits,
                counts,
                torch.tensor([p.presence_penalty for p in params], device=dev),
                torch.tensor([p.frequency_penalty for p in params], device=dev),
            )
        if self.antidistill is not None and any(p.antidistill > 0 for p in params):
            # Perturb the teacher's distribution first; the watermark then biases the result, so
            # its detector sees the same green-list shift as on any other answer.
            logits = apply_antidistill(
                logits, self._tap.last, self.antidistill, [p.antidistill for p in params]
            )
        keys = [p.watermark for p in params]
        stages = {k.params.impl.stage for k in keys if k is not None}  # where their schemes embed
        if "logits" in stages:
            # Green lists: before temperature and top-p, as in the reference: the returned logprobs are those
            # of the watermarked distribution the token is actually drawn from.
            width = max(p.watermark.params.context_width for p in params if p.watermark is not None)
            logits = apply_watermark(logits, self._contexts(rows, width), keys)
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        logprobs = sampling_logprobs(logits, temperature, top_p)  # (B, V)
        if "logprobs" in stages:
            # SynthID's tournament acts on the distribution each row samples from (after
            # temperature and top-p); the logprobs returned are the tournament's.
            width = max(p.watermark.params.context_width for p in params if p.watermark is not None)
            logprobs = apply_watermark(logprobs, self._contexts(rows, width), keys, "logprobs")
        chosen = sample_rows(logprobs, temperature, [r.generator for r in rows])  # (B,)
        k = max((p.top_logprobs or 0) for p in params)
        top_vals = top_ids = None
        if k:
            top_vals, top_ids = logprobs.topk(k, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        chosen_list = chosen.tolist()
        for b, row in enumerate(rows):
            entry = None
            if row.job.params.top_logprobs is not None:
                kk = row.job.params.top_logprobs
                entry = self._entry(chosen_list[b], chosen_lp[b])
                entry["top_logprobs"] = (
                    [self._entry(t, v) for t, v in zip(top_ids[b][:kk], top_vals[b][:kk])]
                    if kk
                    else []
                )
            self._advance(row, chosen_list[b], entry)
        return chosen

    def _contexts(self, rows: list[Row], width: int) -> torch.Tensor:
        """The last ``width`` tokens (prompt, then generated) of each row, left-padded. (B, width)"""
        out = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            tail = row.out_ids[-width:]
            if len(tail) < width:
                tail = (list(row.job.prompt_ids) + row.out_ids)[-width:]
            out[b, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
        return out.to(self.lm.device)

    def _entry(self, token: int, logprob: float) -> dict:
        return {
            "token": self._token_text[token],
            "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(self._token_bytes[token]),
        }

    def _advance(self, row: Row, token: int, entry: dict | None) -> None:
        job, params = row.job, row.job.params
        if job.cancelled.is_set():
            row.finish_reason = "cancelled"
            return
        row.out_ids.append(token)
        job.completion_tokens += 1
        if token in self.lm.eos_token_ids:
            return self._finish(row, "stop")
        start = len(row.text)
        if token not in self._special:
            row.text += row.decoder.decode(self._token_bytes[token])
        if entry is not None:
            row.entries.append((start, len(row.text), entry))
        # The text ends at the earliest stop string, whichever of them it is: with stops
        # ["b", "ab"], "xab" becomes "x", not "xa".
        cuts = [c for s in params.stop if (c := row.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if cuts:
            row.text = row.text[: min(cuts)]
            return self._finish(row, "stop", flush=False)
        if len(row.out_ids) >= params.max_new_tokens:
            return self._finish(row, "length")
        self._emit(row, len(row.text) - row.stop_holdback())

    def _emit(self, row: Row, upto: int) -> None:
        """Send text up to character ``upto`` and the logprob entries of the tokens it covers."""
        new_entries = []
        while row.sent_entries < len(row.entries):
            start, end, entry = row.entries[row.sent_entries]
            if not (start < upto or end <= upto):
                break
            new_entries.append(entry)
            row.sent_entries += 1
        if upto > row.emitted or new_entries:
            row.job.sink(
                Event(
                    "delta",
                    index=row.index,
                    text=row.text[row.emitted : upto],
                    logprobs=new_entries,
                    tokens=row.job.completion_tokens,
                )
            )
            row.emitted = max(row.emitted, upto)

    def _finish(self, row: Row, reason: str, *, flush: bool = True) -> None:
        if flush:  # a token that ended mid-character becomes U+FFFD, as in any UTF-8 decoder
            row.text += row.decoder.decode(b"", final=True)
        row.finish_reason = reason
        self._emit(row, len(row.text))
        job = row.job
        job.sink(Event("finish", index=row.index, finish_reason=reason))
        job.remaining -= 1
        if job.remaining == 0:
            prompt = len(job.prompt_ids)
            job.sink(
                Event(
                    "done",
                    usage={
                        "prompt_tokens": prompt,
                        "completion_tokens": job.completion_tokens,
                        "total_tokens": prompt + job.completion_tokens,
                    },
                )
            )
