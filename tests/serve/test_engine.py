"""The continuous-batching engine in process, with the tiny model.

Greedy decoding makes every row's text a function of its prompt alone, so any difference
between a prompt generated alone and the same prompt generated in a batch (left padding,
caches spliced mid-generation, rows dropped) is a batching bug.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from distillguard.serve.engine import Engine, Event, GenParams, Job

WAIT_S = 60


class Sink:
    """Collects one job's events; ``log`` (shared by several sinks) records their order."""

    def __init__(self, name: str = "", log: list[tuple[str, str]] | None = None):
        self.name = name
        self.log = log if log is not None else []
        self.events: list[Event] = []
        self.done = threading.Event()
        self.started = threading.Event()  # set once a few deltas have arrived
        self._lock = threading.Lock()

    def __call__(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)
            self.log.append((self.name, ev.kind))
            if sum(e.kind == "delta" for e in self.events) >= 5:
                self.started.set()
            if ev.kind in ("done", "error"):
                self.done.set()

    def wait(self, timeout_s: float = WAIT_S) -> None:
        assert self.done.wait(timeout_s), f"job {self.name!r} did not finish in {timeout_s} s"

    def deltas(self, index: int = 0) -> list[str]:
        return [e.text for e in self.events if e.kind == "delta" and e.index == index]

    def text(self, index: int = 0) -> str:
        return "".join(self.deltas(index))

    def finish_reason(self, index: int = 0) -> str | None:
        return next(
            (e.finish_reason for e in self.events if e.kind == "finish" and e.index == index), None
        )


@pytest.fixture(scope="module")
def no_specials(tiny_lm) -> tuple[tuple[int, float], ...]:
    """logit_bias that rules out the special and end-of-generation tokens: exact lengths."""
    return tuple(
        (i, -100.0) for i in sorted(set(tiny_lm.tokenizer.all_special_ids) | tiny_lm.eos_token_ids)
    )


@pytest.fixture
def engine(tiny_lm) -> Iterator[Engine]:
    eng = Engine(tiny_lm, max_batch_rows=16, batch_wait_s=0.05)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompts(tiny_lm) -> dict[str, list[int]]:
    def ids(text: str) -> list[int]:
        return tiny_lm.chat_ids([{"role": "user", "content": text}])

    return {
        "target": ids("Where do rivers go?"),
        "long": ids(
            "Describe, in detail, the course of the Danube from the Black Forest to the sea. " * 2
        ),
        "short": ids("Hi"),
        "runner": ids("Tell me a long story."),
    }


def submit(engine: Engine, prompt: list[int], sink: Sink, **params) -> Job:
    job = Job(prompt_ids=prompt, params=GenParams(**{"temperature": 0.0, **params}), n=1, sink=sink)
    engine.submit(job)
    return job


def alone(engine: Engine, prompt: list[int], **params) -> Sink:
    sink = Sink()
    submit(engine, prompt, sink, **params)
    sink.wait()
    return sink


def test_batch_of_different_lengths_matches_alone(engine, prompts, no_specials):
    names = ["target", "long", "short"]
    expected = {
        n: alone(engine, prompts[n], max_new_tokens=30, logit_bias=no_specials).text()
        for n in names
    }
    sinks = {n: Sink(n) for n in names}
    for n in names:  # arrive together at an idle engine: one left-padded prefill
        submit(engine, prompts[n], sinks[n], max_new_tokens=30, logit_bias=no_specials)
    for n in names:
        sinks[n].wait()
    assert {n: s.text() for n, s in sinks.items()} == expected
    assert len(prompts["long"]) > len(prompts["target"]) > len(prompts["short"])


def test_rows_spliced_into_a_running_batch_match_alone(engine, prompts, no_specials):
    lengths = {"runner": 80, "target": 30, "long": 25, "short": 35}
    expected = {
        n: alone(engine, prompts[n], max_new_tokens=k, logit_bias=no_specials).text()
        for n, k in lengths.items()
    }
    log: list[tuple[str, str]] = []
    sinks = {n: Sink(n, log) for n in lengths}
    submit(
        engine,
        prompts["runner"],
        sinks["runner"],
        max_new_tokens=lengths["runner"],
        logit_bias=no_specials,
    )
    assert sinks["runner"].started.wait(WAIT_S)
    for n in ("target", "long", "short"):  # arrive together while "runner" is mid-generation
        submit(engine, prompts[n], sinks[n], max_new_tokens=lengths[n], logit_bias=no_specials)
    for s in sinks.values():
        s.wait()
    assert {n: s.text() for n, s in sinks.items()} == expected
    # The premise: the newcomers were generated while the runner was still running.
    assert log.index(("target", "done")) < log.index(("runner", "done"))
    assert all(s.finish_reason() == "length" for s in sinks.values())


def test_cancelled_row_leaves_the_batch_without_disturbing_it(engine, prompts, no_specials):
    expected = alone(engine, prompts["runner"], max_new_tokens=60, logit_bias=no_specials).text()
    runner, quitter = Sink("runner"), Sink("quitter")
    submit(engine, prompts["runner"], runner, max_new_tokens=60, logit_bias=no_specials)
    job = submit(engine, prompts["long"], quitter, max_new_tokens=200, logit_bias=no_specials)
    assert quitter.started.wait(WAIT_S)
    job.cancelled.set()
    runner.wait()
    assert runner.text() == expected
    assert not quitter.done.is_set()  # a cancelled job gets no further events
    assert len(quitter.deltas()) < 200


@pytest.fixture(scope="module")
def reference(tiny_lm, prompts, no_specials) -> str:
    """Greedy text of the target prompt, 40 tokens, no stop strings."""
    eng = Engine(tiny_lm)
    eng.start()
    try:
        return alone(eng, prompts["target"], max_new_tokens=40, logit_bias=no_specials).text()
    finally:
        eng.stop()


def pieces(text: str, size: int) -> Iterator[str]:
    """Substrings of whole characters (no U+FFFD, which stands for undecodable bytes)."""
    for k in range(len(text) // 4, len(text) - size):
        piece = text[k : k + size]
        if "\ufffd" not in piece:
            yield piece


def test_stop_string_never_leaks_into_deltas(engine, prompts, no_specials, reference):
    stop = next(pieces(reference, 3))
    sink = alone(engine, prompts["target"], max_new_tokens=40, logit_bias=no_specials, stop=(stop,))
    expected = reference[: reference.index(stop)]
    assert sink.text() == expected
    assert sink.finish_reason() == "stop"
    # Deltas only ever extend the text: a held-back prefix of the stop was never sent and taken back.
    sent = ""
    for delta in sink.deltas():
        sent += delta
        assert expected.startswith(sent)


def test_held_back_text_is_released_when_the_stop_does_not_complete(
    engine, prompts, no_specials, reference
):
    piece = next(pieces(reference, 2))
    stop = piece + "\u2603"  # begins like the text, then a character the text does not have
    assert stop not in reference
    sink = alone(engine, prompts["target"], max_new_tokens=40, logit_bias=no_specials, stop=(stop,))
    assert sink.text() == reference
    assert sink.finish_reason() == "length"


def test_text_ends_at_the_earliest_of_several_stops(engine, prompts, no_specials, reference):
    # stop "abc" and its tail "bc": the text must end before "abc", not keep its "a"
    # because "bc" was checked first.
    stop = next(p for p in pieces(reference, 3) if reference.index(p[1:]) == reference.index(p) + 1)
    sink = alone(
        engine, prompts["target"], max_new_tokens=40, logit_bias=no_specials, stop=(stop[1:], stop)
    )
    assert sink.text() == reference[: reference.index(stop)]
    assert sink.finish_reason() == "stop"


def test_failed_prefill_fails_its_job_and_the_engine_carries_on(
    engine, tiny_lm, prompts, no_specials
):
    broken = Sink("broken")
    submit(
        engine, [tiny_lm.vocab_size + 5], broken, max_new_tokens=5
    )  # a token id the model does not have
    broken.wait(timeout_s=10)  # the job is told, rather than left waiting forever
    assert [e.kind for e in broken.events] == ["error"]
    assert isinstance(broken.events[0].error, IndexError)
    ok = alone(engine, prompts["short"], max_new_tokens=5, logit_bias=no_specials)
    assert ok.finish_reason() == "length" and len(ok.text()) > 0
