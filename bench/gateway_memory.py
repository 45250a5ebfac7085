"""Does the gateway's memory grow with bad requests? Resident memory of a real ``serve`` process
over alternating rounds of valid and hostile requests.

Issue 24 saw the resident set grow 495 -> 686 MB over 546 bad requests. Growth on its own does
not mean a leak: the allocator keeps freed arenas, the tokenizer and torch warm caches, and the
first requests of each kind allocate buffers that are reused after. A leak grows with every
round; warm-up stops. So this runs ``--rounds`` pairs of rounds of ``--requests`` requests each
(a round of valid chat requests, then a round of hostile ones: the fuzzers' schema-valid requests
with hostile edits anywhere, ``tests/guard/hostile.py``, then ``--large`` requests whose prompt is
``--large-mb`` of text, as issue 24's 4 MB prompt), reads the server's VmRSS after every
round, and reports the growth per 1,000 requests over the second half of the run (after warm-up)
for each kind, side by side: the valid rounds are the baseline.

    python bench/gateway_memory.py                        # ~5 minutes on 2 cores
    python bench/gateway_memory.py --rounds 3 --requests 200

Writes ``--out`` (bench/results/gateway_memory.json) with the load average: machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _provenance import code_version  # noqa: E402 - bench/ is on sys.path
from hypothesis import HealthCheck, Phase, given, settings
from rich.progress import Progress

from distillguard.serve.process import serve_subprocess

# The fuzzers' generators, so the hostile rounds are the requests the tests send.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.guard.hostile import BASE, CHAT, mutated_body  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def hostile_bodies(n: int, seed: int) -> list[bytes]:
    bodies: list[bytes] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(mutated_body())
    def collect(body):
        bodies.append(body)

    collect._hypothesis_internal_use_seed = seed  # reproducible draws
    collect()
    return bodies[:n]


def send_all(url: str, key: str, bodies: list[bytes], workers: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as client:

        def one(body: bytes) -> int:
            try:
                return client.post(CHAT, content=body, headers=headers).status_code
            except httpx.HTTPError:
                return -1

        with ThreadPoolExecutor(workers) as pool:
            for status in pool.map(one, bodies):
                statuses[status] = statuses.get(status, 0) + 1
    return statuses


def slope(points: list[tuple[int, float]]) -> float:
    """MB per 1,000 requests, least squares over ``points`` (requests sent, RSS)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main(args) -> dict:
    admin = "admin-" + uuid.uuid4().hex
    valid = json.dumps({**BASE, "max_tokens": 4}).encode()
    words = ("lorem ipsum dolor sit amet " * (args.large_mb * 40_000))[: args.large_mb * 2**20]
    large = json.dumps(
        {**BASE, "max_tokens": 1, "messages": [{"role": "user", "content": words}]}
    ).encode()
    result = {
        "command": "python bench/gateway_memory.py " + " ".join(sys.argv[1:]),
        "code": code_version(),
        "loadavg_before": os.getloadavg(),
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DISTILLGUARD_ADMIN_KEY": admin}
        db = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        with serve_subprocess("--model", "tiny", "--db", db, env=env) as server:
            key = httpx.post(
                f"{server.url}/admin/keys",
                headers={"Authorization": f"Bearer {admin}"},
                json={"account": "bench"},
            ).json()["key"]
            result["rss_start_mb"] = rss_mb(server.proc.pid)
            sent = {"valid": 0, "hostile": 0, "large": 0}
            with Progress() as progress:
                task = progress.add_task("rounds", total=3 * args.rounds)
                for r in range(args.rounds):
                    for kind in ("valid", "hostile", "large"):
                        if kind == "valid":
                            bodies = [valid] * args.requests
                        elif kind == "hostile":
                            bodies = hostile_bodies(args.requests, seed=args.seed + r)
                        else:
                            bodies = [large] * args.large
                        statuses = send_all(server.url, key, bodies, args.workers)
                        sent[kind] += len(bodies)
                        result["rounds"].append(
                            {
                                "round": r,
                                "kind": kind,
                                "sent": sent[kind],
                                "rss_mb": round(rss_mb(server.proc.pid), 1),
                                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                            }
                        )
                        progress.advance(task)
    half = args.rounds // 2
    for kind in ("valid", "hostile", "large"):
        late = [(p["sent"], p["rss_mb"]) for p in result["rounds"] if p["kind"] == kind][half:]
        result[f"{kind}_mb_per_1000_after_warmup"] = (
            round(slope(late), 2) if len(late) > 1 else None
        )
    result["rss_end_mb"] = result["rounds"][-1]["rss_mb"]
    result["server_errors"] = sum(
        v for p in result["rounds"] for k, v in p["statuses"].items() if int(k) >= 500 or k == "-1"
    )
    result["loadavg_after"] = os.getloadavg()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (valid, hostile, large)")
    parser.add_argument("--large", type=int, default=20, help="large-prompt requests per round")
    parser.add_argument("--large-mb", type=int, default=2, help="size of each large prompt")
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--workers", type=int, default=8, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/gateway_memory.json")
    args = parser.parse_args()
    text = json.dumps(main(args), indent=2)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")
