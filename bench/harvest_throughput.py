"""What our harvester costs over a bare client: requests/s and tokens/s side by side, same server.

One server answers every run (by default the fast stub, ``bench/stub_upstream.py``, so that the
client and not the model is what is measured; ``--server tiny`` uses ``distillguard serve
--model tiny --no-guard``, where the model is the bottleneck). Each run sends the same N distinct
chat requests with the same concurrency, in a fresh subprocess:

- ``aiohttp``: a minimal asyncio + aiohttp client (a semaphore, POST, parse the JSON, nothing
  kept): the "no client in the way" baseline;
- ``httpx``: the same with httpx, the HTTP library the harvester uses;
- ``harvester``: ``distillguard.distill.harvest`` as the CLI runs it: fingerprints, the SQLite
  store (every answer committed), a token budget (reserve then settle), retries armed, and the
  CLI's rich progress callback.

Runs come in pairs (baseline and harvester back to back, the order alternating between repeats so
neither always runs first), ``--repeats`` pairs. Reported: the median of each client, and, as the
headline, the **median of the per-pair ratios** harvester / baseline, for throughput (target:
>= 0.90) and for the client's own CPU time per request (``time.process_time`` of the client
process). A machine shared with other work moves wall-clock throughput by 2-3x between runs;
runs of one pair see nearly the same load, and CPU time per request hardly depends on the load
at all, so those two ratios are what to quote.

    nice -n 10 python bench/harvest_throughput.py                    # ~2 minutes
    nice -n 10 python bench/harvest_throughput.py --requests 2000 --concurrency 8,32 --repeats 5
    nice -n 10 python bench/harvest_throughput.py --server tiny --requests 200

Progress goes to stderr, one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = ("aiohttp", "httpx", "harvester")


def bodies(n: int, max_tokens: int) -> list[dict]:
    return [
        {
            "model": "stub",
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "n": 1,
            "messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i * 3}?"}],
        }
        for i in range(n)
    ]


# ---- workers (each in its own process; print one JSON line) ----------------------------------


async def run_aiohttp(url: str, reqs: list[dict], concurrency: int) -> dict:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(body):
            nonlocal tokens
            async with sem, session.post(f"{url}/chat/completions", json=body) as resp:
                data = await resp.json()
                tokens += data["usage"]["completion_tokens"]

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(b) for b in reqs))
        return {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "completion_tokens": tokens,
            "ok": len(reqs),
        }


async def run_httpx(url: str, reqs: list[dict], concurrency: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(body):
            nonlocal tokens
            async with sem:
                resp = await client.post("/chat/completions", json=body)
                tokens += resp.json()["usage"]["completion_tokens"]

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(b) for b in reqs))
        return {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "completion_tokens": tokens,
            "ok": len(reqs),
        }


def run_harvester(url: str, n: int, concurrency: int, max_tokens: int, model: str) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from distillguard.distill import HarvestConfig, ResponseStore, harvest
    from distillguard.distill.prompts import Prompt

    prompts = [
        Prompt(f"q{i}", (("user", b["messages"][0]["content"]),))
        for i, b in enumerate(bodies(n, max_tokens))
    ]
    config = HarvestConfig(
        teacher=url,
        model=model,
        concurrency=concurrency,
        max_tokens=max_tokens,
        temperature=0.7,
        budget_tokens=10**12,
        # the prompts are short by construction; counting them would add a tokenizer's load to
        # the client's CPU time this compares
        max_prompt_tokens=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = ResponseStore(Path(tmp) / "store.sqlite")
        # The CLI's progress bar, drawn to a real (discarded) terminal-like console.
        console = Console(file=open(os.devnull, "w"), force_terminal=True, width=120)
        with Progress(
            TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), console=console
        ) as progress:
            task = progress.add_task("harvest", total=n)

            def on_progress(report, budget):
                progress.update(task, completed=report.stored_ok + sum(report.malformed.values()))

            t0, c0 = time.perf_counter(), time.process_time()
            report = asyncio.run(harvest(config, prompts, store, on_progress=on_progress))
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        stored = store.totals()["responses"]
        store.close()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "completion_tokens": report.completion_tokens,
        "ok": report.stored_ok
        + sum(report.malformed.values()),  # answered (a capped answer counts)
        "stored": stored,
        "malformed": report.malformed,
        "failed": report.failed,
    }


def worker(args) -> None:
    reqs = bodies(args.requests, args.max_tokens)
    for r in reqs:
        r["model"] = args.model
    if args.worker == "aiohttp":
        out = asyncio.run(run_aiohttp(args.url, reqs, args.concurrency_one))
    elif args.worker == "httpx":
        out = asyncio.run(run_httpx(args.url, reqs, args.concurrency_one))
    else:
        out = run_harvester(
            args.url, args.requests, args.concurrency_one, args.max_tokens, args.model
        )
    print(json.dumps(out))


# ---- driver ------------------------------------------------------------------------------------


@contextmanager
def started_server(kind: str) -> Iterator[tuple[str, str]]:
    """The server under test, healthy: (its /v1 URL, the model name to ask for); stopped after."""
    from distillguard.serve.process import free_port, process_until_healthy, serve_subprocess

    if kind == "stub":
        port = free_port()
        started = process_until_healthy(
            [sys.executable, str(HERE / "stub_upstream.py"), "--port", str(port)],
            f"http://127.0.0.1:{port}",
            port=port,
            timeout_s=180,
            poll_s=0.2,
        )
    else:
        started = serve_subprocess(
            "--model", kind, "--no-guard", "--no-watermark", timeout_s=180, poll_s=0.2
        )
    with started as server:
        yield f"{server.url}/v1", kind  # the stub answers to the model name "stub"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--server",
        default="stub",
        help="stub (bench/stub_upstream.py) or a model spec for distillguard serve",
    )
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", default="16", help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", default="aiohttp,harvester", help=f"any of {','.join(CLIENTS)}")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--model", default="stub", help=argparse.SUPPRESS)
    p.add_argument("--concurrency-one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    clients = args.clients.split(",")
    results: dict = {}
    with started_server(args.server) as (url, model):
        for conc in [int(c) for c in args.concurrency.split(",")]:
            runs: dict[str, list[dict]] = {c: [] for c in clients}
            for rep in range(args.repeats):
                for client in clients if rep % 2 == 0 else clients[::-1]:
                    console.print(
                        f"concurrency {conc}, repeat {rep + 1}/{args.repeats}: {client} ..."
                    )
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            client,
                            "--url",
                            url,
                            "--model",
                            model,
                            "--requests",
                            str(args.requests),
                            "--concurrency-one",
                            str(conc),
                            "--max-tokens",
                            str(args.max_tokens),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=1800,
                    )
                    if out.returncode != 0:
                        raise SystemExit(f"{client} worker failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if r["ok"] != args.requests:
                        raise SystemExit(
                            f"{client}: only {r['ok']} of {args.requests} answered: {r}"
                        )
                    r["requests_per_s"] = args.requests / r["seconds"]
                    r["tokens_per_s"] = r["completion_tokens"] / r["seconds"]
                    runs[client].append(r)
            cell = {
                c: {
                    "requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "cpu_ms_per_request": statistics.median(
                        1000 * r["cpu_seconds"] / args.requests for r in rs
                    ),
                    "runs_requests_per_s": [round(r["requests_per_s"], 1) for r in rs],
                }
                for c, rs in runs.items()
            }
            if "harvester" in cell:
                for base in ("aiohttp", "httpx"):
                    if base in cell:
                        pairs = list(zip(runs["harvester"], runs[base]))
                        speed = [h["requests_per_s"] / b["requests_per_s"] for h, b in pairs]
                        cpu = [h["cpu_seconds"] / b["cpu_seconds"] for h, b in pairs]
                        cell[f"harvester_vs_{base}"] = statistics.median(speed)
                        cell[f"harvester_cpu_over_{base}"] = statistics.median(cpu)
                        cell[f"pairs_vs_{base}"] = {
                            "throughput": [round(x, 3) for x in speed],
                            "cpu": [round(x, 3) for x in cpu],
                        }
            results[str(conc)] = cell

    table = Table(
        "concurrency", "client", "req/s (median)", "tok/s", "client CPU ms/req", "runs (req/s)"
    )
    for conc, cell in results.items():
        for c in clients:
            table.add_row(
                conc,
                c,
                f"{cell[c]['requests_per_s']:.0f}",
                f"{cell[c]['tokens_per_s']:.0f}",
                f"{cell[c]['cpu_ms_per_request']:.2f}",
                " ".join(map(str, cell[c]["runs_requests_per_s"])),
            )
    console.print(table)
    for conc, cell in results.items():
        ratios = {k: round(v, 3) for k, v in cell.items() if k.startswith("harvester_")}
        console.print(f"concurrency {conc}: median of per-pair ratios {ratios}")
    report = {
        "bench": "harvest_throughput",
        "server": args.server,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "ratios": "median of per-pair ratios (harvester / baseline; pairs run back to back)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
