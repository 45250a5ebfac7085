"""Latency of a short request alone vs beside a long prompt's prefill, chunked or not (issue 24 #10).

Loads the bundled teacher (or ``--model``) into the serve ``Engine`` and, for each
``--chunks`` setting (``none``: the whole prompt in one forward pass, as before chunked
prefill), measures:

- ``short_alone_s``: a short ShareGPT-style request ("Hi", ``--short-tokens`` tokens) alone,
- ``short_beside_long_s``: the same request submitted while a long real ShareGPT prompt (the
  longest first turn of at most ``--long-tokens`` tokens) is being prefilled; the long one is
  cancelled once the short one is done,
- ``long_first_token_s``: the long prompt's time to its first token, alone.

Each number is the best of ``--rounds`` (the machine is shared); the ratio beside/alone is the
number to quote (issue 24: within 2x). Greedy decoding, no end-of-sequence tokens.

    python bench/prefill_fairness.py                     # SmolLM2, chunks 512 and none
    python bench/prefill_fairness.py --model tiny:ctx=8192 --chunks 64,512,none

Writes bench/results/prefill_fairness.json (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _provenance import code_version  # noqa: E402 - bench/ is on sys.path

from distillguard.distill.prompts import load_prompts
from distillguard.models import load_model
from distillguard.serve.engine import PREFILL_SHARE, Engine, Event, GenParams, Job

ROOT = Path(__file__).resolve().parent.parent


class _Sink:
    def __init__(self):
        self.first = None
        self.done = False

    def __call__(self, ev: Event) -> None:
        if self.first is None and ev.kind in ("delta", "finish"):
            self.first = time.perf_counter()
        self.done = self.done or ev.kind in ("done", "error")


def _run(eng: Engine, prompt: list[int], tokens: int, bias) -> tuple[Job, _Sink]:
    sink = _Sink()
    job = Job(
        prompt_ids=prompt,
        n=1,
        sink=sink,
        params=GenParams(max_new_tokens=tokens, temperature=0.0, logit_bias=bias),
    )
    eng.submit(job)
    return job, sink


def _wait(sink: _Sink, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while not sink.done:
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not finish a request in time")
        time.sleep(0.002)


def measure(lm, chunk: int | None, short: list[int], long: list[int], args, bias) -> dict:
    eng = Engine(lm, batch_wait_s=0.01, prefill_chunk=chunk)
    eng.start()
    try:
        _wait(_run(eng, short, 4, bias)[1])  # warm-up: the first forward passes are slow
        alone, beside, first = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            _wait(_run(eng, short, args.short_tokens, bias)[1])
            alone.append(time.perf_counter() - t0)
            long_job, long_sink = _run(eng, long, 1, bias)
            time.sleep(0.2)  # its prefill is under way
            t0 = time.perf_counter()
            _wait(_run(eng, short, args.short_tokens, bias)[1])
            beside.append(time.perf_counter() - t0)
            long_job.cancelled.set()
            time.sleep(0.5)  # let the engine drop it
            t0 = time.perf_counter()
            _, sink = _run(eng, long, 1, bias)
            _wait(sink)
            first.append(sink.first - t0)
        return {
            "prefill_chunk": chunk,
            "short_alone_s": min(alone),
            "short_beside_long_s": min(beside),
            "ratio": min(beside) / min(alone),
            "long_first_token_s": min(first),
        }
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--chunks", default="512,none", help="comma-separated prefill_chunk values; none: unchunked"
    )
    ap.add_argument("--long-tokens", type=int, default=3000, help="longest long prompt to take")
    ap.add_argument("--short-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/prefill_fairness.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    bias = tuple((i, -100.0) for i in sorted(set(lm.tokenizer.all_special_ids) | lm.eos_token_ids))
    short = lm.chat_ids([{"role": "user", "content": "Hi"}])
    candidates = [
        lm.chat_ids([{"role": r, "content": c} for r, c in p.messages])
        for p in load_prompts("sharegpt", limit=600)
    ]
    long = max(
        (c for c in candidates if len(c) <= min(args.long_tokens, lm.context_length - 8)), key=len
    )
    rows = []
    for value in args.chunks.split(","):
        chunk = None if value.strip() == "none" else int(value)
        rows.append(measure(lm, chunk, short, long, args, bias))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": args.model,
        "long_prompt_tokens": len(long),
        "short_tokens": args.short_tokens,
        "rounds": args.rounds,
        "prefill_share": PREFILL_SHARE,
        "torch_threads": torch.get_num_threads(),
        "commit": code_version(),
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
