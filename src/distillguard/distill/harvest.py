"""Harvest a teacher through its OpenAI-compatible API: async, bounded, resumable, within budget.

* **Exactly once.** Each request has a fingerprint (its canonical JSON); responses are committed
  to the :class:`ResponseStore` as they arrive, in group commits at most ``commit_window_s``
  apart (one WAL commit for every answer of the window; 0 commits each answer on its own), and a
  rerun skips stored fingerprints. The fingerprint also goes out as ``Idempotency-Key``: a
  distillguard gateway answers a resent key from its ledger instead of generating again, which
  closes the last gap (an answer received but not yet committed here when the harvester was
  killed is replayed, not generated or billed again). Against a teacher without idempotency
  replay, a ``kill -9`` can cost at most one window of answers; set the window to 0 there.
* **Budget never exceeded.** Before a request is sent, its worst case (prompt bytes + n x
  max_tokens, priced) is reserved against the budget; the reservation becomes the actual usage
  when the answer arrives. Spending of earlier runs (in the store) counts.
* **Retries** on 429, 5xx, timeouts and broken connections: exponential backoff with full
  jitter, at least the server's ``Retry-After``.
* **Prompts over ``max_prompt_tokens``** (in the teacher's chat template, counted with
  ``tokenizer``) are not sent, and counted: one pasted document's prefill holds up a CPU
  teacher's whole batch (:mod:`distillguard.distill.prompt_length`).
* **Malformed answers** (no choices, empty, not JSON) and **capped** ones (cut at max_tokens,
  finish_reason 'length', stored as 'malformed:truncated') are counted apart and stored (they
  were paid for) but kept out of the data, capped ones unless asked for. With ``n`` > 1 that is
  decided per choice: a response is 'ok' when any of its choices is usable, and only those are
  exported.
* **Cheap client.** HTTP goes through aiohttp: on a small machine httpx's async client costs
  about ten times the CPU per request and capped the harvest at ~10% of what a bare aiohttp client
  gets from the same server (``bench/harvest_throughput.py``). Answers are parsed with orjson and
  stored as the raw bytes the teacher sent (not parsed and serialised again), each request's
  content size is computed once, and the progress callback runs at most every
  ``progress_interval_s`` (a rich bar redraws at 10 Hz anyway), so per request the harvester
  costs little more CPU than a bare client.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from distillguard.distill.harvest_config import HarvestConfig
from distillguard.distill.prompt_length import PromptTokenCounter
from distillguard.distill.prompts import Prompt
from distillguard.distill.store import ResponseStore, classify, classify_choice, fingerprint
from distillguard.errors import IncompleteError

if TYPE_CHECKING:
    import aiohttp

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class HarvestReport:
    planned: int = 0
    skipped_done: int = 0  # already in the store from an earlier run
    sent: int = 0
    stored_ok: int = 0
    malformed: dict[str, int] = field(
        default_factory=dict
    )  # responses with no usable answer, by why
    answers_ok: int = (
        0  # usable answers (choices) among the stored responses: n per response at most
    )
    answers_malformed: dict[str, int] = field(default_factory=dict)  # unusable choices, by why
    failed: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    budget_stopped: int = 0  # not sent: the budget could not cover their worst case
    over_prompt_cap: int = 0  # not sent (nor exported): longer than max_prompt_tokens
    # not sent again: the same request as an earlier prompt of this run (ShareGPT repeats prompts;
    # the fingerprint is the Idempotency-Key, so two in flight at once got 409s, not two answers)
    repeated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    # the request fingerprint of each prompt within max_prompt_tokens, in the prompts' order: the
    # keys of this run's answers in the store
    fingerprints: list[str] = field(default_factory=list, repr=False)

    @property
    def capped(self) -> int:
        """Answers (choices) that reached max_tokens (finish_reason 'length'): not malformed, only
        unfinished, and left out of the data unless asked for (``--keep-capped``)."""
        return self.answers_malformed.get("malformed:truncated", 0)

    def to_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "fingerprints"}
        out["answers_capped"] = self.capped
        return out

    def finished(self) -> int:
        """Prompts accounted for so far: answered now or before, malformed, failed or over budget."""
        return (
            self.skipped_done
            + self.stored_ok
            + sum(self.malformed.values())
            + sum(self.failed.values())
            + self.budget_stopped
            + self.over_prompt_cap
            + self.repeated
        )

    def transient_failures(self) -> int:
        """Failed requests a rerun may still get answered (429, 5xx, timeouts, connection errors
        after their retries), as opposed to those the teacher refused (e.g. 400: prompt too long)."""
        return sum(count for reason, count in self.failed.items() if is_transient(reason))

    def unfinished(self) -> str | None:
        """What failed and whether a rerun can help, or None when nothing failed."""
        if not self.failed:
            return None
        why = ", ".join(f"{reason} {count}" for reason, count in sorted(self.failed.items()))
        transient = self.transient_failures()
        refused = sum(self.failed.values()) - transient
        return (
            f"{sum(self.failed.values())} of {self.planned} teacher requests failed ({why}); every answer "
            "received is stored"
            + (
                f"; a rerun sends only the failed ones ({transient} of them may succeed then)"
                if transient
                else ""
            )
            + (
                f"; {refused} the teacher refused, which a rerun gets again: read its error in the "
                "teacher's log or ledger"
                if refused
                else ""
            )
        )


def is_transient(reason: str) -> bool:
    """Whether a failure reason in :attr:`HarvestReport.failed` is one that retrying can cure."""
    return reason in ("timeout", "connection") or (
        reason.startswith("http_") and int(reason[5:]) in RETRY_STATUS
    )


class _Budget:
    """Reserve-then-settle accounting; all calls happen on one event loop (no awaits inside).

    The prompt's token count is bounded by its content bytes (a byte-level or SentencePiece
    token covers at least one byte) plus what the teacher's chat template adds, which only the
    teacher knows (a default system prompt can add dozens of tokens). The first answer tells:
    until it arrives requests go one at a time with a generous allowance, then the allowance is
    the largest overhead seen.
    """

    INITIAL_OVERHEAD = 1024

    def __init__(self, config: HarvestConfig, spent_tokens: int, spent_usd: float):
        self.config = config
        self.tokens = spent_tokens
        self.usd = spent_usd
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        self.overhead: int | None = None  # template tokens beyond the content bytes, once observed

    @property
    def limited(self) -> bool:
        return self.config.budget_tokens is not None or self.config.budget_usd is not None

    def prompt_bound(self, size: int) -> int:
        """Upper bound on the prompt tokens of a request whose messages hold ``size`` content bytes."""
        return size + (self.INITIAL_OVERHEAD if self.overhead is None else self.overhead)

    def observe(self, size: int, prompt_tokens: int) -> None:
        if prompt_tokens:
            self.overhead = max(self.overhead or 0, prompt_tokens - size)

    def reserve(self, prompt_bound: int) -> tuple[int, float] | None:
        c = self.config
        tokens = prompt_bound + c.n * c.max_tokens
        usd = c.cost(prompt_bound, c.n * c.max_tokens)
        if (
            c.budget_tokens is not None
            and self.tokens + self.reserved_tokens + tokens > c.budget_tokens
        ):
            return None
        if c.budget_usd is not None and self.usd + self.reserved_usd + usd > c.budget_usd + 1e-12:
            return None
        self.reserved_tokens += tokens
        self.reserved_usd += usd
        return tokens, usd

    def settle(self, reservation: tuple[int, float], tokens: int, usd: float) -> None:
        self.reserved_tokens -= reservation[0]
        self.reserved_usd -= reservation[1]
        self.tokens += tokens
        self.usd += usd


def content_bytes(body: dict) -> int:
    return sum(len(str(m.get("content", "")).encode()) for m in body["messages"])


def count_answers(report: HarvestReport, response: object, status: str, n: int) -> None:
    """Add one stored response's choices to the per-answer counts."""
    if status == "malformed:invalid":
        report.answers_malformed[status] = report.answers_malformed.get(status, 0) + n
        return
    for choice in response["choices"]:
        why = classify_choice(choice)
        if why == "ok":
            report.answers_ok += 1
        else:
            report.answers_malformed[why] = report.answers_malformed.get(why, 0) + 1


async def harvest(
    config: HarvestConfig,
    prompts: list[Prompt],
    store: ResponseStore,
    *,
    on_progress: Callable[[HarvestReport, _Budget], None] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> HarvestReport:
    """Send every prompt not yet in ``store`` to the teacher; return what happened."""
    report = HarvestReport(planned=len(prompts))
    started = time.perf_counter()
    done = store.done()
    totals = store.totals()
    budget = _Budget(config, totals["tokens"], totals["cost_usd"])
    counter = PromptTokenCounter.load(config.tokenizer) if config.max_prompt_tokens else None
    todo = []
    planned: set[str] = set()
    for prompt in prompts:
        body = config.request(prompt)
        # Over the cap whether or not an earlier run stored an answer: a run's data is the same
        # on every rerun of its command.
        if counter is not None and counter.count(body["messages"]) > config.max_prompt_tokens:
            report.over_prompt_cap += 1
            continue
        fp = fingerprint(body)
        if fp in planned:
            report.repeated += 1
            continue
        planned.add(fp)
        report.fingerprints.append(fp)
        if fp in done:
            report.skipped_done += 1
        else:
            todo.append((prompt, body, fp))
    # Imported here: the CLI imports this package at every start-up, and only a harvest needs it.
    import aiohttp

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    own_session = session is None
    session = session or aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=config.timeout_s, connect=10),
        connector=aiohttp.TCPConnector(limit=config.concurrency),
    )
    calibrating = asyncio.Lock()
    loop = asyncio.get_running_loop()
    next_progress = 0.0

    def progress(final: bool = False) -> None:
        nonlocal next_progress
        if on_progress is not None and (final or time.monotonic() >= next_progress):
            next_progress = time.monotonic() + config.progress_interval_s
            on_progress(report, budget)

    pending: list[tuple] = []  # answers received, not yet committed
    flush_timer: asyncio.TimerHandle | None = None

    def flush() -> None:
        nonlocal flush_timer
        if flush_timer is not None:
            flush_timer.cancel()
            flush_timer = None
        if pending:
            rows = pending[:]
            pending.clear()
            store.put_many(rows)

    def keep(row: tuple) -> None:
        nonlocal flush_timer
        pending.append(row)
        if config.commit_window_s == 0 or len(pending) >= config.commit_batch:
            flush()
        elif flush_timer is None:
            flush_timer = loop.call_later(config.commit_window_s, flush)

    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker() -> None:
        while True:
            try:
                prompt, body, fp = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if budget.limited and budget.overhead is None:
                async with calibrating:  # one request at a time until an answer shows the overhead
                    if budget.overhead is None:
                        await one(prompt, body, fp)
                        continue
            await one(prompt, body, fp)

    async def one(prompt: Prompt, body: dict, fp: str) -> None:
        size = content_bytes(body)
        reservation = budget.reserve(budget.prompt_bound(size))
        if reservation is None:
            report.budget_stopped += 1
            return
        tokens, usd = 0, 0.0
        try:
            outcome = await _send(session, config, body, fp, report)
            if outcome is not None:
                status, response, raw = outcome
                usage = response.get("usage") if isinstance(response, dict) else None
                p = int((usage if isinstance(usage, dict) else {}).get("prompt_tokens") or 0)
                c = int((usage if isinstance(usage, dict) else {}).get("completion_tokens") or 0)
                tokens, usd = p + c, config.cost(p, c)
                budget.observe(size, p)
                keep(
                    (
                        fp,
                        prompt.id,
                        body,
                        raw if isinstance(response, dict) else None,
                        status,
                        p,
                        c,
                        usd,
                    )
                )
                report.prompt_tokens += p
                report.completion_tokens += c
                report.cost_usd += usd
                count_answers(report, response, status, config.n)
                if status == "ok":
                    report.stored_ok += 1
                else:
                    report.malformed[status] = report.malformed.get(status, 0) + 1
        finally:
            budget.settle(reservation, tokens, usd)
            progress()

    try:
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    finally:
        flush()
        progress(final=True)
        if own_session:
            await session.close()
    report.seconds = time.perf_counter() - started
    return report


def run_stoppable(coro):
    """``asyncio.run(coro)``, where SIGTERM stops it the way Ctrl-C does: the main task is cancelled,
    so its ``finally`` blocks run (the harvest's last group commit: answers received in the commit
    window are stored, not lost with the process). Raises :class:`IncompleteError` when stopped.

    asyncio.Runner already turns SIGINT into a cancellation; SIGTERM (``kill``, a container stop,
    ``timeout``) would otherwise end the process at once.
    """
    import signal

    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        main: list[asyncio.Task] = []

        async def wrapper():
            main.append(asyncio.current_task())
            return await coro

        stopped = []

        def on_term() -> None:
            stopped.append(True)
            if main:
                main[0].cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_term)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            pass
        try:
            return runner.run(wrapper())
        except asyncio.CancelledError:
            if not stopped:
                raise
            raise IncompleteError(
                "stopped by SIGTERM; every answer received is stored, and rerunning the same "
                "command continues where it stopped"
            ) from None
        finally:
            try:
                loop.remove_signal_handler(signal.SIGTERM)
            except (NotImplementedError, RuntimeError, ValueError):
                pass


async def _send(
    session: aiohttp.ClientSession,
    config: HarvestConfig,
    body: dict,
    fp: str,
    report: HarvestReport,
) -> tuple[str, object, bytes] | None:
    """POST with retries; (status, parsed answer, raw body), or None when it finally failed (not stored)."""
    import aiohttp

    url = config.base_url + "/chat/completions"
    for attempt in range(config.max_retries + 1):
        wait = None
        try:
            if attempt == 0:
                report.sent += 1
            async with session.post(url, json=body, headers={"Idempotency-Key": fp[:64]}) as resp:
                raw = await resp.read()
                if resp.status == 200:
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        return "malformed:invalid", None, raw
                    return classify(parsed, config.n), parsed, raw
                if resp.status not in RETRY_STATUS:
                    reason = f"http_{resp.status}"
                    report.failed[reason] = report.failed.get(reason, 0) + 1
                    return None
                wait = _retry_after(resp.headers.get("retry-after"))
                failure = f"http_{resp.status}"
        except TimeoutError:  # aiohttp's timeouts subclass it
            failure = "timeout"
        except aiohttp.ClientError:  # refused, reset, disconnected, broken body
            failure = "connection"
        if attempt == config.max_retries:
            report.failed[failure] = report.failed.get(failure, 0) + 1
            return None
        report.retries += 1
        backoff = random.uniform(0, config.backoff_s * 2**attempt)  # full jitter
        await asyncio.sleep(max(backoff, wait or 0.0))
    return None  # pragma: no cover - the loop always returns


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value is not None else None
    except ValueError:
        return None
