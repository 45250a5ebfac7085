"""SynthID served per account: the engine runs each row's tournament with its own account key on
the distribution it samples, returns that distribution's logprobs, leaves other rows alone; over
real HTTP the ledger records the key id and the CLI traces the text back (tiny model), and with
the bundled teacher one ~64-token answer is detected under its account and not another."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest
import torch
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model, load_tokenizer
from distillguard.serve.engine import Engine, GenParams, Job, Row
from distillguard.serve.sampling import sampling_logprobs
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.synthid import processor_for, tournament
from tests.servers import run_cli, serve_process

# A fixed secret, with the fixed seeds of the requests, makes every answer, key and p-value below
# the same on each run (on one machine: float rounding may differ on another), so the p-value
# bounds check the scheme, not the luck of a draw: with a fresh secret per run one 64-token answer
# of the bundled teacher misses p < 1e-3 in ~3% of runs (teacher-layers detected 0.9688 at 64
# tokens in bench/results/watermark_quality.json), and the tiny model's trace once gave 7.4e-6
# against its 1e-6 bound. The secret was written down before any run, not chosen among secrets
# that pass.
SECRET = "test-synthid-serve-fixed-secret-0"
ADMIN = "admin-" + uuid.uuid4().hex
SYNTHID = WatermarkParams(scheme="synthid")


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine(load_model("tiny"))  # not started: _choose is called directly


def _rows(engine: Engine, keys, *, temperature=0.8, top_p=0.9, seed=3) -> list[Row]:
    rows = []
    for i, key in enumerate(keys):
        job = Job(
            prompt_ids=[5, 6, 7, 8, 9 + i],
            n=1,
            sink=lambda ev: None,
            params=GenParams(
                max_new_tokens=50,
                temperature=temperature,
                top_p=top_p,
                top_logprobs=5,
                watermark=key,
            ),
        )
        job.remaining = 1
        rows.append(Row(job, 0, torch.Generator().manual_seed(seed + i)))
    return rows


def test_engine_tournament_per_row_key_and_untouched_rows(tiny_engine):
    a, b = (account_key(SECRET.encode(), name, SYNTHID) for name in ("acct-a", "acct-b"))
    torch.manual_seed(0)
    logits = torch.randn(4, tiny_engine.lm.vocab_size) * 0.5
    keys = [a, None, b, a]
    rows = _rows(tiny_engine, keys)
    plain = _rows(tiny_engine, [None] * 4)
    chosen = tiny_engine._choose(rows, logits)
    chosen_plain = tiny_engine._choose(plain, logits)
    # the unwatermarked row: same token and bitwise the same logprobs as in an unwatermarked batch
    assert int(chosen[1]) == int(chosen_plain[1])
    assert rows[1].entries == plain[1].entries
    # watermarked rows: the returned logprobs are the tournament's over the tempered, top-p'd
    # distribution, with the row's own key and its own context
    base = sampling_logprobs(logits.float(), torch.full((4,), 0.8), torch.full((4,), 0.9))
    for r in (0, 2, 3):
        key = keys[r]
        ctx = torch.tensor([rows[r].job.prompt_ids[-4:]])
        want = tournament(
            [processor_for(key.hash_key, SYNTHID.synthid)], SYNTHID.synthid, base[r : r + 1], ctx
        )[0]
        entry = rows[r].entries[0][2]
        tok = int(chosen[r])
        assert entry["logprob"] == pytest.approx(max(float(want[tok]), -9999.0), abs=1e-5)
        top = want.topk(5).values.clamp(min=-9999.0).tolist()
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(top, abs=1e-5)
        assert top[1] > -9999.0  # several tokens left to choose between
        assert float(want[tok]) > -float("inf")  # never a token top-p ruled out
        # another key gives another distribution
        other = b if key is a else a
        alt = tournament(
            [processor_for(other.hash_key, SYNTHID.synthid)], SYNTHID.synthid, base[r : r + 1], ctx
        )[0]
        assert not torch.allclose(alt, want)
    # top-p's impossible tokens stay impossible after the tournament
    assert bool(torch.isinf(base[0]).any())


def test_served_synthid_traces_each_account_over_http(tmp_path):
    """Two accounts through the gateway with --watermark-scheme synthid: streaming, n=2 and seeds
    work, the ledger records each account's key id, and the CLI names the right account."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    texts: dict[str, list[str]] = {"acct-a": [], "acct-b": []}
    with serve_process(
        "--model", "tiny", "--db", db, "--watermark-scheme", "synthid", env=env
    ) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {
            a: httpx.post(f"{url}/admin/keys", json={"account": a}, headers=admin).json()["key"]
            for a in texts
        }

        # The tiny model draws random bytes: non-ASCII ones make invalid UTF-8, which does not
        # survive the round trip through text and would break the 5-grams the detector re-reads.
        tok = load_tokenizer("tiny")
        ascii_only = {str(i): -100 for i in range(len(tok)) if i >= 128 and i != tok.eos_token_id}

        def ask(account: str, i: int, **extra) -> httpx.Response:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"tell me {i}"}],
                "max_tokens": 60,
                "seed": i,
                "temperature": 0.9,
                "logit_bias": ascii_only,
                **extra,
            }
            return httpx.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {keys[account]}"},
                timeout=120,
            )

        for account in texts:
            for i in range(4):
                r = ask(account, i, logprobs=True, top_logprobs=2, n=2)
                assert r.status_code == 200
                for choice in r.json()["choices"]:
                    assert all(e["logprob"] <= 0 for e in choice["logprobs"]["content"])
                    texts[account].append(choice["message"]["content"])
            streamed = ask(account, 9, stream=True)
            assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        # a seed fixes the answer under the watermark too; rows of other accounts in the same
        # batch do not disturb it
        first = ask("acct-a", 1).json()["choices"][0]["message"]["content"]
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(ask("acct-b", 7).text))]
        threads[0].start()
        again = ask("acct-a", 1).json()["choices"][0]["message"]["content"]
        threads[0].join()
        assert first == again
    engine = make_engine(db)
    with engine.connect() as conn:
        marks = {(r.account_id, r.watermark_key_id) for r in conn.execute(select(LedgerRow))}
    engine.dispose()
    assert marks == {(a, account_key(SECRET.encode(), a, SYNTHID).key_id) for a in texts}

    out = tmp_path / "a.jsonl"
    assert (
        run_cli("ledger", "export", "--db", db, "--account", "acct-a", "-o", str(out)).returncode
        == 0
    )
    detect = run_cli(
        "watermark",
        "detect",
        "--file",
        str(out),
        "--accounts",
        "acct-a,acct-b,acct-c",
        "--scheme",
        "synthid",
        "--model",
        "tiny",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
    )
    assert detect.returncode == 0, detect.stderr
    result = json.loads(detect.stdout)
    assert result["detector"] == "layers" and result["traced"] == ["acct-a"]
    by_account = {k["account"]: k for k in result["keys"]}
    assert by_account["acct-a"]["p_holm"] < 1e-6 and by_account["acct-b"]["p_holm"] > 1e-3


@pytest.mark.slow
def test_bundled_teacher_answer_of_64_tokens_is_detected_under_its_account(tmp_path):
    """The bundled teacher served with SynthID: one ~64-token answer (T=0.7, fixed seed) is
    detected under its account by the entropy-aware detector, and not under another."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    with serve_process(
        "--model", "smollm2", "--db", db, "--watermark-scheme", "synthid", env=env, timeout_s=300
    ) as url:
        key = httpx.post(
            f"{url}/admin/keys",
            json={"account": "acct-a"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).json()["key"]
        body = {
            "model": "smollm2",
            "max_tokens": 64,
            "temperature": 0.7,
            "seed": 11,
            "messages": [
                {
                    "role": "user",
                    "content": "Write a short story about a lighthouse keeper and a storm.",
                }
            ],
        }
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] >= 48
    out = tmp_path / "a.jsonl"
    assert (
        run_cli("ledger", "export", "--db", db, "--account", "acct-a", "-o", str(out)).returncode
        == 0
    )
    detect = run_cli(
        "watermark",
        "detect",
        "--file",
        str(out),
        "--accounts",
        "acct-a,acct-b",
        "--scheme",
        "synthid",
        "--teacher",
        "smollm2",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
        timeout=300,
    )
    assert detect.returncode == 0, detect.stderr
    result = json.loads(detect.stdout)
    assert result["detector"] == "teacher-layers" and result["traced"] == ["acct-a"]
    by_account = {k["account"]: k for k in result["keys"]}
    assert by_account["acct-a"]["p_holm"] < 1e-3 and by_account["acct-b"]["p_holm"] > 1e-2
