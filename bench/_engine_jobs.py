"""Helpers shared by the watermark benches: real ShareGPT prompts, and jobs run through the
in-process serve ``Engine`` (the same continuous batching and per-row ``_choose`` as the server).

Not a bench itself (the leading underscore); ``python bench/<script>.py`` puts ``bench/`` on
``sys.path``, so the scripts import it as ``_engine_jobs``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from distillguard.data.sharegpt import iter_conversations
from distillguard.models import LoadedModel
from distillguard.serve.engine import Engine, Event, GenParams, Job


@dataclass(frozen=True)
class Prompt:
    index: int  # position among the first prompts kept (after skipping long ones)
    conversation_id: str
    text: str
    ids: tuple[int, ...]  # chat-template token ids, ending with the assistant cue


def sharegpt_prompts(
    lm: LoadedModel, n: int, *, skip: int = 0, max_prompt_tokens: int = 256, max_chars: int = 2000
) -> list[Prompt]:
    """The first ``n`` usable ShareGPT first prompts in file order, after the first ``skip`` usable
    ones: deterministic. Very long prompts (over ``max_chars`` characters or ``max_prompt_tokens``
    tokens with the template) and exact duplicates are skipped."""
    out: list[Prompt] = []
    seen: set[str] = set()
    kept = 0
    for conv in iter_conversations():
        text = conv.first_prompt
        if text is None or len(text) > max_chars or text.strip() in seen:
            continue
        seen.add(text.strip())
        ids = lm.chat_ids([{"role": "user", "content": text}])
        if len(ids) > max_prompt_tokens:
            continue
        kept += 1
        if kept <= skip:
            continue
        out.append(Prompt(index=kept - 1, conversation_id=conv.id, text=text, ids=tuple(ids)))
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(
            f"only {len(out)} usable ShareGPT prompts after skipping {skip}; ask for fewer"
        )
    return out


@dataclass
class Result:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_jobs(
    engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[GenParams], on_done=None
) -> tuple[list[Result], list[Job]]:
    """Submit one job per prompt (all at once, so the engine batches them) and wait for all.
    ``on_done(i)`` is called from the engine thread as job ``i`` finishes."""
    results = [Result() for _ in prompts]

    def sink_for(i: int):
        res = results[i]

        def sink(ev: Event) -> None:
            if ev.kind == "delta":
                res.text += ev.text
            elif ev.kind == "finish":
                res.finish_reason = ev.finish_reason
            elif ev.kind in ("done", "error"):
                if ev.kind == "error":
                    res.error = ev.error
                else:
                    res.completion_tokens = ev.usage["completion_tokens"]
                res.done.set()
                if on_done is not None:
                    on_done(i)

        return sink

    jobs = [
        Job(prompt_ids=list(p), params=gp, n=1, sink=sink_for(i))
        for i, (p, gp) in enumerate(zip(prompts, params))
    ]
    for job in jobs:
        engine.submit(job)
    for res in results:
        res.done.wait()
        if res.error is not None:
            raise RuntimeError("generation failed in the engine") from res.error
    return results, jobs
