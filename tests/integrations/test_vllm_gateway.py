"""The gateway drives the vLLM plugin: ``distillguard serve --upstream URL --upstream-engine vllm``
in front of the session's real vLLM server. Each account's answers carry its own watermark key
(the ledger records its id, never the secret), and the investigator's CLI traces an account's
ledger export to that account alone; a client cannot send ``vllm_xargs`` (or any other vLLM
field) to change or remove the watermark. An account under ``limit_logprobs`` gets at most its
cap of ``top_logprobs`` from vLLM, and the logprobs an account gets are those of the
distribution the plugin sampled from (vLLM's ``--logprobs-mode processed_logprobs``),
recomputed here with our engine's own step on the teacher's logits.

One gateway serves all of it (a start costs tens of seconds on CI's 2 cores), in front of the
session's one vLLM server (minutes)."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.integrations.rows import WatermarkRows
from distillguard.serve.keymaterial import XARG, Sampler, encode
from distillguard.watermark import WatermarkParams, account_key
from tests.integrations.conftest import SERVED_NAME
from tests.integrations.test_vllm_server import PROMPTS
from tests.servers import run_cli, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SECRET = "vllm-gateway-test-secret-0"  # fixed, written down before any run
ADMIN = "admin-" + uuid.uuid4().hex
ACCOUNTS = ["acct-a", "acct-b"]
CAPPED = "acct-capped"  # put at 'suspect' by an admin: limit_logprobs with a cap of 2
CAP = 2
POLICY = {"logprobs_cap": CAP, "ladder": {"suspect": ["log", "limit_logprobs"]}}


def test_gateway_watermarks_each_account_through_vllm_and_traces_it(vllm_server, tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with serve_process(
        "--upstream",
        vllm_server,
        "--upstream-engine",
        "vllm",
        "--db",
        db,
        "--policy",
        str(policy),
        env=env,
    ) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {
            a: httpx.post(f"{url}/admin/keys", json={"account": a}, headers=admin).json()["key"]
            for a in [*ACCOUNTS, CAPPED]
        }
        _logprobs_are_capped_and_sampled_from(url, keys, admin, db)
        clients = {
            a: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0, timeout=600)
            for a, k in keys.items()
        }

        def ask(account, i):
            kw = dict(
                model=SERVED_NAME,
                messages=[{"role": "user", "content": PROMPTS[i]}],
                max_tokens=64,
                temperature=0.7,
                seed=i,
            )
            if i % 2:  # streamed answers go through the same path
                chunks = clients[account].chat.completions.create(stream=True, **kw)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return clients[account].chat.completions.create(**kw).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, a, i) for a in ACCOUNTS for i in range(len(PROMPTS))]
            answers = [f.result() for f in futures]
        assert all(answers)

        # A client's vllm_xargs (to drop or swap the key) never reaches vLLM: refused, 400.
        for xargs in ({"distillguard": "{}"}, {"distillguard": None}, {"other": 1}):
            with pytest.raises(openai.BadRequestError) as err:
                clients["acct-a"].chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    extra_body={"vllm_xargs": xargs},
                )
            assert err.value.body["code"] == "unknown_parameter"
        for c in clients.values():
            c.close()

    params = WatermarkParams()
    engine = make_engine(db)
    with engine.connect() as conn:
        rows = list(conn.execute(select(LedgerRow)))
    engine.dispose()
    served = {
        (r.account_id, r.watermark_key_id)
        for r in rows
        if r.status == 200 and r.account_id in ACCOUNTS
    }
    assert served == {(a, account_key(SECRET.encode(), a, params).key_id) for a in ACCOUNTS}

    for account in ACCOUNTS:
        out = tmp_path / f"{account}.jsonl"
        exported = run_cli("ledger", "export", "--db", db, "--account", account, "-o", str(out))
        assert exported.returncode == 0, exported.stderr
        detect = run_cli(
            "watermark",
            "detect",
            "--file",
            str(out),
            "--accounts",
            "acct-a,acct-b,acct-c",
            "--model",
            "smollm2",
            "--json",
            env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
            timeout=600,
        )
        assert detect.returncode == 0, detect.stderr
        result = json.loads(detect.stdout)
        # A's answers traced to A alone, B's to B alone (so not to A)
        assert result["traced"] == [account], result


def _logprobs_are_capped_and_sampled_from(url: str, keys: dict, admin: dict, db: str) -> None:
    set_level = httpx.post(
        f"{url}/admin/accounts/{CAPPED}/verdict", json={"level": "suspect"}, headers=admin
    )
    assert set_level.status_code == 201, set_level.text
    kw = dict(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=24,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        logprobs=True,
        top_logprobs=5,
    )
    answers = {}
    for account in ("acct-a", CAPPED):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=keys[account], max_retries=0) as c:
            answers[account] = c.chat.completions.create(**kw).choices[0].logprobs.content
    # the cap reaches vLLM: at most CAP alternatives per token (the uncapped account gets 5)
    assert answers[CAPPED] and {len(t.top_logprobs) for t in answers[CAPPED]} == {CAP}
    assert {len(t.top_logprobs) for t in answers["acct-a"]} == {5}
    engine = make_engine(db)
    with engine.connect() as conn:
        actions = conn.execute(
            select(LedgerRow.policy_action).where(LedgerRow.account_id == CAPPED)
        ).all()
    engine.dispose()
    assert [a for (a,) in actions] and all("limit_logprobs" in a for (a,) in actions), actions

    # what vLLM returned is the plugin's distribution: the teacher's logits through our
    # engine's step (temperature 0.7, top-p 0.9, the watermark) with acct-a's key, recomputed
    # here; the teacher's raw logprobs (what vLLM returns without processed_logprobs) are not
    from distillguard.models.loader import load_model

    lm = load_model("smollm2", device="cpu")
    tok = lm.tokenizer
    content = answers["acct-a"]
    text = "".join(t.token for t in content)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # vLLM's tokens, as ids: the answer re-tokenised, checked piece by piece
    assert [tok.decode([i]) for i in ids] == [t.token for t in content], "re-tokenised"
    prompt = tok.apply_chat_template(kw["messages"], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    # serve's default scheme (--watermark-scheme synthid): the tournament's distribution
    key = account_key(SECRET.encode(), "acct-a", WatermarkParams(scheme="synthid"))
    rows = WatermarkRows()
    output: list[int] = []
    params = SimpleNamespace(extra_args={XARG: encode(key, Sampler(0.7, 0.9))})
    rows.update([], [(0, params, prompt, output)], [])
    processed, raw = [], torch.log_softmax(logits, -1)
    for t in range(len(ids)):
        output[:] = ids[:t]  # the row's live output, as vLLM keeps it
        step = torch.log_softmax(rows.apply(logits[t : t + 1].clone())[0], -1)
        processed.append(step)
    got = torch.tensor([t.logprob for t in content])
    ours = torch.stack([processed[t][tid] for t, tid in enumerate(ids)])
    theirs_raw = torch.stack([raw[t][tid] for t, tid in enumerate(ids)])
    # vLLM's CPU kernels and transformers' differ in the 5th-6th digit of a logit
    assert torch.allclose(got, ours, atol=2e-2), (got - ours).abs().max()
    assert (got - theirs_raw).abs().max() > 0.1  # the check can tell the two apart
    # and so are the alternatives: vLLM's top 5 at each step are ours, down to a probability of
    # e^-15 (below it the tournament's float32 rounding shows: e^-46 in one, exactly 0 in the
    # other; top-p's cut tokens are -inf, which vLLM writes as -9999 in JSON)
    top = torch.tensor([sorted((x.logprob for x in e.top_logprobs), reverse=True) for e in content])
    ours_top = torch.stack([p.topk(5).values for p in processed])
    assert torch.allclose(top.clamp(min=-15), ours_top.clamp(min=-15), atol=2e-2)
    assert (top > -15).sum() > len(content)  # alternatives were compared, not only the floor
