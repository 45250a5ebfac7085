"""How long the embedded teacher's answers to ShareGPT prompts are when nothing cuts them: the
numbers behind ``distill harvest``'s default ``--max-tokens``.

Starts ``distillguard serve`` on the embedded teacher (no guard: nothing here is about the guard),
harvests the first ``--prompts`` ShareGPT prompts within the default ``--max-prompt-tokens`` at
the harvest's default temperature, with a ``--ceiling`` far above a typical answer, and writes the
quantiles of the answers' completion tokens, the share that ended on their own (finish_reason
stop) and the share each candidate ``--max-tokens`` would let finish, to
``bench/results/harvest_answer_length.json``.

    nice -n 10 python bench/harvest_answer_length.py     # ~10 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from distillguard.distill.harvest import harvest
from distillguard.distill.harvest_config import HarvestConfig
from distillguard.distill.prompts import load_prompts
from distillguard.distill.store import ResponseStore
from distillguard.serve.process import serve_subprocess

HERE = Path(__file__).resolve().parent
CANDIDATES = (128, 256, 384, 512, 768, 1024)
QUANTILES = (0.5, 0.75, 0.8, 0.9, 0.95, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="first N ShareGPT prompts")
    parser.add_argument("--ceiling", type=int, default=1024, help="max_tokens of the requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results/harvest_answer_length.json")
    args = parser.parse_args()
    prompts = load_prompts("sharegpt", limit=args.prompts)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        with serve_subprocess(
            "--no-guard", "--threads", str(args.threads), timeout_s=600
        ) as server:
            config = HarvestConfig(
                teacher=server.url,
                concurrency=args.concurrency,
                max_tokens=args.ceiling,
                timeout_s=3600,
            )
            store = ResponseStore(Path(tmp) / "store.sqlite")
            t0 = time.perf_counter()
            report = asyncio.run(harvest(config, prompts, store))
            seconds = time.perf_counter() - t0
            answers = [
                (c["finish_reason"], rec["response"]["usage"]["completion_tokens"])
                for rec in store.records(only_ok=False)
                for c in rec["response"]["choices"]
            ]
            store.close()
    lengths = np.array([n for _, n in answers])
    stopped = np.array([f == "stop" for f, _ in answers])
    result = {
        "what": "completion tokens of the embedded teacher's answers to the first ShareGPT prompts "
        "(within the default --max-prompt-tokens), at the harvest's default temperature",
        "teacher": "smollm2 (embedded SmolLM2-135M-Instruct), distillguard serve --no-guard",
        "prompts": len(prompts),
        "skipped_over_prompt_cap": report.over_prompt_cap,
        "max_prompt_tokens": config.max_prompt_tokens,
        "answers": len(answers),
        "temperature": config.temperature,
        "ceiling_max_tokens": args.ceiling,
        "ended_on_their_own": float(stopped.mean()),
        "quantiles": {str(q): float(np.quantile(lengths, q)) for q in QUANTILES},
        "mean": float(lengths.mean()),
        "finished_share_by_max_tokens": {
            str(c): float((stopped & (lengths <= c)).mean()) for c in CANDIDATES
        },
        "failed": report.failed,
        "seconds": seconds,
        "completion_tokens_per_s": float(lengths.sum() / seconds),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
