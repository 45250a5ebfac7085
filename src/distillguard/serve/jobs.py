"""What the engine takes and hands back: a request's sampling parameters (``GenParams``), the
request itself (``Job``), the events its sink receives (``Event``), and the state of one choice
being generated (``Row``)."""

from __future__ import annotations

import codecs
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distillguard.watermark import WatermarkKey


# A frozen dataclass, not a pydantic config: a value built per request
# from a body the request schema already validated, with no help text or CLI option to share.
# Not for speed: a pydantic twin costs 1.7 us a construction against 1.4 (timeit, CPU time).
@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0..20: that many alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    watermark: WatermarkKey | None = None  # the account's key; None: not watermarked
    antidistill: float = 0.0  # λ of antidistillation sampling (policy ``antidistill``); 0: off


@dataclass
class Event:
    """What a job's sink receives. kind: delta | finish | done | error."""

    kind: str
    index: int = 0
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    error: BaseException | None = None
    tokens: int = (
        0  # delta: the job's completion tokens so far (all choices), this delta's included
    )


@dataclass
class Job:
    prompt_ids: list[int]
    params: GenParams
    n: int
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    remaining: int = 0
    completion_tokens: int = 0


@dataclass
class _Chunked:
    """A long prompt being prefilled a chunk per step, in a cache of its own (batch of one)."""

    job: Job
    rows: list[Row]
    done: int = 0  # prompt tokens already in the cache
    cache: object = None


class Row:
    """One choice being generated: incremental detokenisation, stop strings, logprob entries."""

    def __init__(self, job: Job, index: int, generator: torch.Generator):
        self.job = job
        self.index = index
        self.generator = generator
        self.out_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already sent
        self.entries: list[tuple[int, int, dict]] = []  # (start char, end char, entry)
        self.sent_entries = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish_reason: str | None = None

    def stop_holdback(self) -> int:
        """Characters at the end of text that could still begin a stop string: not safe to send."""
        for k in range(
            min(len(self.text), max((len(s) for s in self.job.params.stop), default=0) - 1), 0, -1
        ):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.job.params.stop):
                return k
        return 0
