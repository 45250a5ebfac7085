"""Two gateway replicas sharing one ledger and one Redis enforce a key's limits exactly together."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.servers import run_cli, server_process


def test_two_replicas_share_limits_exactly(tmp_path, redis_url):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    made = run_cli("keys", "create", "--account", "hydra", "--rpm", "50", "--db", db, "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    args = ("--model", "tiny", "--db", db, "--redis", redis_url)
    with server_process(*args) as a, server_process(*args) as b:

        async def fire() -> list[int]:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 1,
            }
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(
                headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
            ) as client:
                replies = await asyncio.gather(
                    *(
                        client.post(f"{(a, b)[i % 2].url}/v1/chat/completions", json=body)
                        for i in range(200)
                    )
                )
            return [r.status_code for r in replies]

        codes = asyncio.run(fire())
    assert codes.count(200) == 50, sorted(set(codes))
    assert codes.count(429) == 150
