"""Act 2 of ``distillguard demo``: the live gateway (``distillguard serve`` in a subprocess), a
distiller harvesting it and benign users asking it, and what the ledger then says about each."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distillguard.arena.demo_config import DISTILLER, POLICY, DemoConfig, Say
from distillguard.watermark.secret import write_secret


@contextmanager
def gateway(cfg: DemoConfig, env: dict[str, str]) -> Iterator[str]:
    """``distillguard serve`` on a free loopback port; yields its base URL once /healthz answers."""
    from distillguard.serve.process import serve_subprocess

    with serve_subprocess(
        "--model",
        cfg.model,
        "--db",
        f"sqlite:///{cfg.out / 'ledger.db'}",
        "--detect",
        str(cfg.out / "calibration.npz"),
        "--policy",
        str(cfg.out / "policy.yaml"),
        "--extracting-after",
        str(cfg.extracting_after),
        "--threads",
        str(cfg.threads),
        log_path=cfg.out / "server.log",
        env=env,
        timeout_s=cfg.startup_timeout_s,
        poll_s=0.2,
    ) as server:
        yield server.url


async def _user(
    client, model: str, prompts: list[str], max_tokens: int, rng: random.Random
) -> list[int | str]:
    """A person: a few questions, reading each answer before the next (think time of seconds)."""
    from openai import APIStatusError, APITimeoutError

    statuses: list[int | str] = []
    for prompt in prompts:
        await asyncio.sleep(rng.uniform(1.0, 4.0))
        try:
            await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.7,
            )
            statuses.append(200)
        except APIStatusError as exc:
            statuses.append(exc.status_code)
        except APITimeoutError:  # a machine too busy to answer within the client's timeout:
            statuses.append("timeout")  # the user gave up, as the report says; the demo goes on
    return statuses


async def _live_traffic(
    cfg: DemoConfig, url: str, keys: dict[str, str], model: str, on_progress
) -> dict:
    from openai import AsyncOpenAI

    from distillguard.distill.harvest import HarvestConfig, harvest
    from distillguard.distill.prompts import load_prompts
    from distillguard.distill.store import ResponseStore

    extract = load_prompts("sharegpt", limit=cfg.extract, max_chars=cfg.max_prompt_chars)
    asked = load_prompts(
        "sharegpt", skip=5000, limit=cfg.users * cfg.user_requests, max_chars=cfg.max_prompt_chars
    )
    hcfg = HarvestConfig(
        teacher=url,
        api_key=keys[DISTILLER],
        model=model,
        max_tokens=cfg.max_tokens,
        temperature=0.7,
        top_logprobs=5,
        concurrency=cfg.concurrency,
        max_retries=2,
        timeout_s=600.0,
    )
    hdir = cfg.out / "harvest"
    store = ResponseStore(hdir / "store.sqlite")
    rng = random.Random(cfg.seed)
    users = [name for name in keys if name != DISTILLER]
    clients = [
        AsyncOpenAI(base_url=url + "/v1", api_key=keys[u], max_retries=0, timeout=600.0)
        for u in users
    ]
    try:
        tasks = [
            _user(
                c,
                model,
                [p.messages[-1][1] for p in asked[i :: len(users)]],
                cfg.max_tokens,
                random.Random(rng.random()),
            )
            for i, c in enumerate(clients)
        ]
        report, *user_statuses = await asyncio.gather(
            harvest(hcfg, extract, store, on_progress=on_progress), *tasks
        )
    finally:
        for c in clients:
            await c.close()
    rows = store.export_jsonl(hdir / "data.jsonl")
    store.close()
    return {
        "harvest": {**report.to_dict(), "data_rows": rows},
        "users": {u: dict(Counter(s)) for u, s in zip(users, user_statuses)},
    }


def act_live(cfg: DemoConfig, say: Say, on_harvest_progress=None) -> dict:
    """Serve the teacher behind the guard; a distiller and benign users call it; read the ledger."""
    import httpx

    for stale in (
        "ledger.db",
        "ledger.db-wal",
        "ledger.db-shm",
    ):  # every run starts from an empty ledger
        (cfg.out / stale).unlink(missing_ok=True)
    shutil.rmtree(cfg.out / "harvest", ignore_errors=True)
    (cfg.out / "harvest").mkdir()
    (cfg.out / "policy.yaml").write_text(json.dumps(POLICY, indent=2) + "\n")  # JSON is YAML
    secret = secrets.token_hex(32)
    write_secret(
        cfg.out / "watermark.secret", secret
    )  # 0600: whoever reads it can trace and forge watermarks
    admin = "admin-" + secrets.token_hex(16)
    env = {"DISTILLGUARD_WATERMARK_SECRET": secret, "DISTILLGUARD_ADMIN_KEY": admin}
    accounts = [DISTILLER] + [f"user-{i + 1}" for i in range(cfg.users)]
    with gateway(cfg, env) as url:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60
        ) as http:
            keys = {}
            for name in accounts:
                resp = http.post("/admin/keys", json={"account": name})
                resp.raise_for_status()
                keys[name] = resp.json()["key"]
            models = http.get(
                "/v1/models", headers={"Authorization": f"Bearer {keys[DISTILLER]}"}
            ).json()
            model = models["data"][0]["id"]
            say(
                f"gateway on {url} serving {model!r}: {cfg.extract} requests from the distiller, "
                f"{cfg.user_requests} each from {cfg.users} users"
            )
            traffic = asyncio.run(_live_traffic(cfg, url, keys, model, on_harvest_progress))
            verdicts = http.get("/admin/verdicts").json()
    traffic["ledger"] = _ledger_summary(cfg.out / "ledger.db", accounts)
    traffic["verdicts"] = verdicts
    traffic["model"] = model
    return traffic


def _ledger_summary(db: Path, accounts: list[str]) -> dict:
    """Per account, from the ledger alone: requests, statuses, and when each countermeasure began."""
    from sqlalchemy import select

    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(LedgerRow.account_id, LedgerRow.status, LedgerRow.policy_action).order_by(
                    LedgerRow.ts, LedgerRow.id
                )
            ).all()
    finally:
        engine.dispose()
    out = {}
    for name in accounts:
        mine = [r for r in rows if r.account_id == name]
        entry: dict = {"requests": len(mine), "statuses": dict(Counter(r.status for r in mine))}
        for what, test in (
            ("suspect", lambda a: a.startswith("suspect")),
            ("extracting", lambda a: a.startswith("extracting")),
            ("canary", lambda a: "canary" in a),
        ):
            hits = [i for i, r in enumerate(mine, 1) if r.policy_action and test(r.policy_action)]
            entry[f"{what}_from_request"] = hits[0] if hits else None
            entry[f"{what}_requests"] = len(hits)
        out[name] = entry
    return out
