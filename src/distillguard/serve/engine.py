"""Continuous batching for a local transformers model.

One worker thread owns the model. Requests (``Job``) queue up; at every decoding step the
worker admits waiting jobs into the running batch (prefill, then splice their KV cache into
the batch's), decodes one token for every active row with each row's own sampling
parameters and random generator, streams the new text to the job, and drops finished rows.
Requests arriving together are therefore generated together, and a request never waits for
a whole batch to drain. A job with ``n`` choices occupies ``n`` rows.

A prompt longer than ``prefill_chunk`` tokens is prefilled on its own, a chunk per step, in a
cache of its own, and joins the batch when its prompt is in: one long prompt would otherwise
hold every row for its whole prefill (and pad every prompt admitted with it to its length).
While other rows are decoding, its chunks get at most ``PREFILL_SHARE`` seconds per second of
decoding, so those rows' requests take at most about 1 + PREFILL_SHARE times as long.
A job whose client is gone (``Job.cancelled``) leaves at the next step: a row's cache is
dropped after its next token, a long prefill stops before its next chunk, and a job still
waiting is never prefilled.

Shapes: B rows, T cached positions, V vocabulary. The cache is left-padded: row ``b`` holds
real tokens in its last ``mask[b].sum()`` positions.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import torch

from distillguard.models import LoadedModel
from distillguard.serve.antidistill import HiddenTap
from distillguard.serve.emission import LOGPROB_FLOOR, RowEmission
from distillguard.serve.jobs import Event, GenParams, Job, Row, _Chunked
from distillguard.serve.kvcache import (
    DynamicLayer,
    _copy_cache,
    _RoomyLayer,
    _shared_len,
    _template_prefix,
)

# GenParams, Event, Job and Row live in serve/jobs.py, the cache helpers in serve/kvcache.py,
# LOGPROB_FLOOR and the token choice and emission in serve/emission.py; callers import them from
# here, as before the split.
__all__ = ["LOGPROB_FLOOR", "PREFILL_SHARE", "Engine", "Event", "GenParams", "Job", "Row"]

log = logging.getLogger(__name__)

# Seconds of long-prompt prefill allowed per second of decoding the running rows: a short
# request running beside a long prefill takes at most ~1.5x as long (issue 24 asks <= 2x).
PREFILL_SHARE = 0.5


T = TypeVar("T")


@dataclass
class _Call:
    """Work on the model for the worker thread to run between steps (:meth:`Engine.call`)."""

    fn: Callable[[LoadedModel], object]
    future: Future

    def run(self, lm: LoadedModel) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                self.future.set_result(self.fn(lm))
        except Exception as exc:  # noqa: BLE001 - the caller's to handle, not the worker's
            self.future.set_exception(exc)


class Engine(RowEmission):
    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch_rows: int = 16,
        batch_wait_s: float = 0.005,
        prefill_chunk: int | None = 512,
    ):
        self.lm = lm
        self.prefill_chunk = prefill_chunk
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Job | _Call | None] = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._thread = threading.Thread(target=self._loop, name="distillguard-engine", daemon=True)
        self._stopped = False
        self._token_bytes = lm.token_bytes
        self._token_text = [b.decode("utf-8", errors="replace") for b in self._token_bytes]
        self._special = set(lm.tokenizer.all_special_ids)
        self._pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        # transformers 5 renamed the KV-cache argument and output field ``past_key_values`` to
        # ``cache`` (the old name warns, and goes in 5.40); older releases only know the old name.
        params = inspect.signature(lm.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        # Prefill needs the logits of each prompt's last position only; the output layer over
        # every position costs about a fifth of the prefill (SmolLM2: 49k-token vocabulary).
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # The chat template's opening (often a default system prompt) starts most prompts: its
        # KV cache is computed once and reused by every prefill (see _prefill).
        self._prefix = _template_prefix(lm)
        self._prefix_cache = None  # None: not computed yet; False: the cache type can't be reused
        self.antidistill = None  # AntidistillDirection, set by enable_antidistill
        self._tap = None
        self._chunked: _Chunked | None = None
        self._credit = 0.0  # seconds of decoding not yet matched by prefill (see PREFILL_SHARE)
        self._chunk_s = 0.0  # duration of the last chunk
        self._reset()

    # ---- public API -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._tap is not None:  # the model may outlive the engine (and be copied): unhook it
            self._tap.close()
            self._tap = None

    def enable_antidistill(self, direction) -> None:
        """Allow rows with ``GenParams.antidistill > 0`` (see ``distillguard.serve.antidistill``)."""
        if self._tap is None:
            self._tap = HiddenTap(self.lm)
        self.antidistill = direction

    def submit(self, job: Job) -> None:
        job.remaining = job.n
        self._queue.put(job)

    def call(self, fn: Callable[[LoadedModel], T]) -> Future[T]:
        """Run ``fn(lm)`` on the worker thread, between two decoding steps, and return its future.

        The worker is the model's only user (its cache, the antidistillation tap's hook): work
        on the model from another thread (scoring a prompt, ``/v1/completions``) goes through
        here instead of racing a step."""
        future: Future[T] = Future()
        self._queue.put(_Call(fn, future))
        return future

    # ---- worker -----------------------------------------------------------------------
    def _reset(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 for real tokens
        self.next_ids: torch.Tensor | None = None  # (B,) token each row feeds next step

    def _loop(self) -> None:
        while not self._stopped:
            if not self.rows and not self._waiting and self._chunked is None:
                job = self._queue.get()  # idle: block until work arrives
                if job is None:
                    return
                if isinstance(job, _Call):
                    job.run(self.lm)
                    continue
                self._waiting.append(job)
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            self._drain_queue()
            try:
                self._step()
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("generation failed")
                for job in {id(r.job): r.job for r in self.rows}.values():
                    job.sink(Event("error", error=exc))
                self._reset()

    def _drain_queue(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._stopped = True
                return
            if isinstance(job, _Call):
                job.run(self.lm)  # between steps: no row's forward pass is in flight
                continue
            self._waiting.append(job)

    @torch.inference_mode()
    def _step(self) -> None:
        if self.rows:
            t0 = time.perf_counter()
            self._decode()
            if self._chunked is not None:
                self._credit += time.perf_counter() - t0
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:
                # These jobs are in no row yet, so _loop's handler cannot reach them: tell them
                # here, or their clients wait forever.
                for job in admitted:
                    job.sink(Event("error", error=exc))
                raise
        # A chunk runs once decoding has paid for it in advance (its cost guessed from the last
        # chunk's), so the rows never wait for more than their share, plus one chunk in flight.
        if self._chunked is not None and (
            not self.rows or self._credit >= self._chunk_s / PREFILL_SHARE
        ):
            busy, t0 = bool(self.rows), time.perf_counter()
            self._prefill_chunk()
            self._chunk_s = time.perf_counter() - t0
            # With nobody waiting on it, prefill runs flat out and owes nothing.
            self._credit = self._credit - self._chunk_s / PREFILL_SHARE if busy else 0.0
        if self._chunked is None:
            self._credit = self._chunk_s = 0.0
        self._prune()

    def _admit(self) -> list[Job]:
        """Take waiting jobs, first come first served, while their rows fit: short prompts to
        prefill together now, a long one (one at a time) to prefill a chunk per step. Later
        short prompts may pass a long one waiting for the chunked slot; cancelled jobs go."""
        chunked = self._chunked
        free = self.max_batch_rows - len(self.rows) - (chunked.job.n if chunked else 0)
        admitted: list[Job] = []
        kept: deque[Job] = deque()
        blocked = False
        for job in self._waiting:
            if job.cancelled.is_set():
                continue  # its client is gone: never prefilled
            long = self.prefill_chunk is not None and len(job.prompt_ids) > self.prefill_chunk
            if blocked or (long and self._chunked is not None):
                kept.append(job)
                continue
            # A job with more choices than the batch has rows runs when it would be alone.
            if not (job.n <= free or not self.rows and not admitted and self._chunked is None):
                kept.append(job)
                blocked = True
                continue
            if long:
                self._chunked = _Chunked(job, self._new_rows(job))
            else:
                admitted.append(job)
            free -= job.n
        self._waiting = kept
        return admitted

    def _decode(self) -> None:
        dev = self.lm.device
        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=dev)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = (self.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        out = self.lm.model(
            input_ids=self.next_ids[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_key: self.cache},
        )
        self.cache = out[self._cache_key]
        self.next_ids = self._choose(self.rows, out.logits[:, -1, :])

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the rows of ``jobs`` in one forward pass and add them to the batch.

        Prompts are left-padded to a common width. The part of each prompt shared with the
        template prefix need not be recomputed: with ``W`` input columns, row ``b`` (prompt of
        ``L_b`` tokens) feeds its last ``min(W, L_b)`` tokens and takes the cache of its first
        ``k_b = L_b - W`` tokens from the precomputed prefix cache, left-padded to the widest
        ``k``. ``W`` is the smallest width for which each ``k_b`` lies within the prefix that row
        shares; rows share the layout the cache has anyway: pads, then real tokens.
        """
        dev = self.lm.device
        rows = [row for job in jobs for row in self._new_rows(job)]
        prompts = [r.job.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        past = None
        prefix_cache = self._get_prefix_cache() if self._prefix else None
        if prefix_cache:
            width = max(1, max(len(p) - _shared_len(p, self._prefix) for p in prompts))
        skip = [
            max(0, len(p) - width) for p in prompts
        ]  # k_b: leading tokens taken from the prefix cache
        k = max(skip)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), k + width), dtype=torch.long)
        for b, p in enumerate(prompts):
            fed = p[skip[b] :]
            ids[b, width - len(fed) :] = torch.tensor(fed)
            mask[b, k + width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, k:]
        if k:
            # Column j of row b's past holds prefix position j - (k - k_b); earlier columns are
            # padding (masked; they repeat position 0).
            cols = (
                (torch.arange(k)[None, :] - (k - torch.tensor(skip))[:, None]).clamp(min=0).to(dev)
            )
            past = _copy_cache(prefix_cache)
            for layer in past.layers:
                layer.keys = layer.keys[0][:, cols].transpose(0, 1)  # (H, B, k, D) -> (B, H, k, D)
                layer.values = layer.values[0][:, cols].transpose(0, 1)
        out = self.lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **({self._cache_key: past} if past is not None else {}),
            **self._last_logits,
        )
        next_ids = self._choose(rows, out.logits[:, -1, :])
        self._join(rows, out[self._cache_key], mask, next_ids)

    def _new_rows(self, job: Job) -> list[Row]:
        rows = []
        for i in range(job.n):
            gen = torch.Generator(device=self.lm.device)
            if job.params.seed is None:
                gen.seed()
            else:
                # n choices of one seeded request differ from each other, and each is fixed.
                gen.manual_seed((job.params.seed * 1_000_003 + i) % (2**63))
            rows.append(Row(job, i, gen))
        return rows

    def _join(self, rows: list[Row], cache, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Make freshly prefilled rows the batch, or merge them into the running one."""
        if not self.rows:
            for layer in getattr(cache, "layers", ()):
                if DynamicLayer is not None and type(layer) is DynamicLayer:
                    layer.__class__ = _RoomyLayer  # same state; decoding appends without copying
            self.rows, self.cache, self.mask, self.next_ids = rows, cache, mask, next_ids
        else:
            self._merge(rows, cache, mask, next_ids)

    def _prefill_chunk(self) -> None:
        """Feed the next ``prefill_chunk`` tokens of the long prompt; once all are in, choose its
        first tokens and join the batch. A failure fails that job alone: the batch's own cache
        was not touched."""
        c = self._chunked
        job, prompt, dev = c.job, c.job.prompt_ids, self.lm.device
        if job.cancelled.is_set():
            self._chunked = None  # its cache goes with it
            return
        try:
            if c.done == 0 and self._prefix and (prefix_cache := self._get_prefix_cache()):
                # The template's opening is cached already: start after it (at least one token
                # must be fed, for the logits of the last one).
                c.done = min(_shared_len(prompt, self._prefix), len(prompt) - 1)
                if c.done:
                    c.cache = _copy_cache(prefix_cache)
                    for layer in c.cache.layers:
                        layer.keys, layer.values = (
                            layer.keys[:, :, : c.done],
                            layer.values[:, :, : c.done],
                        )
            end = min(len(prompt), c.done + self.prefill_chunk)
            past = {self._cache_key: c.cache} if c.cache is not None else {}
            out = self.lm.model(
                input_ids=torch.tensor([prompt[c.done : end]], device=dev),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=dev),
                position_ids=torch.arange(c.done, end, device=dev)[None, :],
                use_cache=True,
                **past,
                **self._last_logits,
            )
            c.cache, c.done = out[self._cache_key], end
            if end < len(prompt):
                return
            self._chunked = None
            n = len(c.rows)
            logits = out.logits[:, -1, :].expand(n, -1)
            if n > 1:
                c.cache.batch_repeat_interleave(n)
                if self._tap is not None:
                    self._tap.last = self._tap.last.expand(n, -1)
            next_ids = self._choose(c.rows, logits)
        except Exception as exc:
            log.exception("prefill of a %d-token prompt failed", len(prompt))
            self._chunked = None
            job.sink(Event("error", error=exc))
            return
        self._join(
            c.rows, c.cache, torch.ones((n, len(prompt)), dtype=torch.long, device=dev), next_ids
        )

    def _get_prefix_cache(self):
        """KV cache of the template prefix (batch of one), computed on first use; False when the
        model's cache is not made of plain growing layers and so can't be spliced this way."""
        if self._prefix_cache is None:
            dev = self.lm.device
            ids = torch.tensor([self._prefix], device=dev)
            out = self.lm.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(len(self._prefix), device=dev)[None, :],
                use_cache=True,
                **self._last_logits,
            )
            cache = out[self._cache_key]
            layers = getattr(cache, "layers", None)
            ok = (
                DynamicLayer is not None
                and bool(layers)
                and all(type(layer) is DynamicLayer for layer in layers)
            )
            self._prefix_cache = cache if ok else False
        return self._prefix_cache

    def _merge(self, rows: list[Row], cache, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Append new rows to the running batch, left-padding whichever cache is shorter."""
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(old_layer, name), getattr(new_layer, name)  # (B, H, T, D)
                a = torch.nn.functional.pad(a, (0, 0, width - t_old, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - t_new, 0))
                setattr(old_layer, name, torch.cat([a, b], dim=0))
        self.mask = torch.cat(
            [
                torch.nn.functional.pad(self.mask, (width - t_old, 0)),
                torch.nn.functional.pad(mask, (width - t_new, 0)),
            ],
            dim=0,
        )
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.rows = self.rows + rows

    def _prune(self) -> None:
        """Drop finished rows from the batch, then cache columns no remaining row uses."""
        keep = [b for b, r in enumerate(self.rows) if r.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.lm.device)
        self.cache.batch_select_indices(idx)
        self.rows = [self.rows[b] for b in keep]
        self.mask = self.mask[idx]
        self.next_ids = self.next_ids[idx]
        unused = int(
            (self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum()
        )  # all-pad left columns
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:, :]
                layer.values = layer.values[:, :, unused:, :]
