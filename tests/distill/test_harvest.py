"""Harvesting a real teacher server: resumable, exactly once, within budget, retries on 429."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from distillguard.distill import HarvestConfig, ResponseStore, harvest, load_prompts
from distillguard.distill.harvest import _Budget, classify, classify_choice, content_bytes
from distillguard.distill.store import fingerprint
from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.serve.process import distillguard_command
from tests.servers import serve_process

ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(base URL, ledger URL) of a guarded tiny teacher: its ledger is the teacher's own request count."""
    db = f"sqlite:///{tmp_path_factory.mktemp('teacher') / 'ledger.db'}"
    with serve_process(
        "--model", "tiny", "--db", db, "--no-watermark", env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as url:
        yield url, db


def make_key(teacher, account: str, **limits) -> str:
    r = httpx.post(
        f"{teacher[0]}/admin/keys",
        json={"account": account, **limits},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    return r.json()["key"]


def prompts_file(tmp_path, n: int, tag: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"{tag} question {i}"}) + "\n" for i in range(n)
        )
    )
    return path


def generations(db: str, account: str) -> collections.Counter:
    """How many times the teacher generated an answer for each prompt of ``account``."""
    engine = make_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(
            select(LedgerRow.request_body, LedgerRow.status, LedgerRow.policy_action).where(
                LedgerRow.account_id == account
            )
        ).all()
    engine.dispose()
    return collections.Counter(
        r.request_body["messages"][0]["content"]
        for r in rows
        if r.status == 200 and r.policy_action != "idempotent_replay"
    )


def test_unit_pieces():
    from distillguard.distill.harvest import HarvestReport

    assert HarvestReport(planned=3).unfinished() is None
    mixed = HarvestReport(planned=9, failed={"http_400": 2, "http_503": 1, "timeout": 1})
    assert mixed.transient_failures() == 2
    assert (
        "(2 of them may succeed then)" in mixed.unfinished()
        and "2 the teacher refused" in mixed.unfinished()
    )
    assert (
        "may succeed" not in HarvestReport(planned=1, failed={"http_401": 1}).unfinished()
    )  # a bad key stays bad
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "max_tokens": 5}
    assert fingerprint(body) == fingerprint(dict(reversed(list(body.items()))))
    assert content_bytes(body) == len("héllo".encode())
    budget = _Budget(HarvestConfig(teacher="http://x", budget_tokens=5000, max_tokens=5), 0, 0.0)
    size = content_bytes(body)
    assert budget.prompt_bound(size) == 6 + _Budget.INITIAL_OVERHEAD  # unknown template: generous
    budget.observe(size, 31)  # the teacher's template added 25 tokens to 6 content bytes
    budget.observe(size, 20)
    assert budget.prompt_bound(size) == 6 + 25
    assert (
        budget.reserve(4996) is None and budget.reserve(4995) is not None
    )  # + 5 completion tokens
    ok = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    assert classify(ok, 1) == "ok"
    assert (
        classify({"choices": [{"message": {"content": " "}, "finish_reason": "stop"}]}, 1)
        == "malformed:empty"
    )
    assert (
        classify({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}, 1)
        == "malformed:truncated"
    )
    assert (
        classify({"choices": []}, 1) == "malformed:invalid"
        and classify([1], 1) == "malformed:invalid"
    )
    # n > 1: one usable choice makes the response usable; otherwise a cut-off choice names it
    cut = {"message": {"content": "x"}, "finish_reason": "length"}
    empty = {"message": {"content": ""}, "finish_reason": "stop"}
    assert classify({"choices": [cut, empty, ok["choices"][0]]}, 3) == "ok"
    assert (
        classify({"choices": [empty, cut]}, 2)
        == classify({"choices": [cut, empty]}, 2)
        == "malformed:truncated"
    )
    assert classify({"choices": [empty, empty]}, 2) == "malformed:empty"
    assert classify({"choices": [ok["choices"][0], {"message": {}}]}, 2) == "malformed:invalid"
    assert (
        classify({"choices": [ok["choices"][0]]}, 2) == "malformed:invalid"
    )  # fewer choices than asked


def test_export_keeps_each_usable_choice(tmp_path):
    """Usability is judged per choice: a cut-off or empty choice does not take its paid siblings
    with it, also in a response stored under the older all-or-nothing status."""

    def choice(i, content, finish="stop"):
        return {
            "index": i,
            "message": {"content": content},
            "finish_reason": finish,
            "logprobs": {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]},
        }

    mixed = {
        "choices": [choice(0, "cut", "length"), choice(1, "  "), choice(2, "whole answer")],
        "usage": {},
    }
    old_status = {"choices": [choice(0, "cut", "length"), choice(1, "kept too")], "usage": {}}
    dead = {"choices": [choice(0, "cut", "length"), choice(1, "")], "usage": {}}
    store = ResponseStore(tmp_path / "store.sqlite")
    req = {"messages": [{"role": "user", "content": "q"}], "n": 3}
    store.put_many(
        [
            ("f1", "p1", req, mixed, classify(mixed, 3), 1, 1, 0.0),
            ("f2", "p2", req, old_status, "malformed:truncated", 1, 1, 0.0),
            ("f3", "p3", req, dead, classify(dead, 2), 1, 1, 0.0),
            ("f4", "p4", req, None, "malformed:invalid", 1, 0, 0.0),
        ]
    )
    assert classify(mixed, 3) == "ok" and classify(dead, 2) == "malformed:truncated"
    out = tmp_path / "data.jsonl"
    assert store.export_jsonl(out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["response"]) for r in rows] == [
        ("p1#2", "whole answer"),
        ("p2#1", "kept too"),
    ]
    assert all(r["finish_reason"] == "stop" and r["logprobs"] for r in rows)
    # keep_capped adds the non-empty answers cut at max_tokens, marked; empty and unparsable stay out
    assert store.export_jsonl(out, keep_capped=True) == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["id"], r["finish_reason"]) for r in rows) == [
        ("p1#0", "length"),
        ("p1#2", "stop"),
        ("p2#0", "length"),
        ("p2#1", "stop"),
        ("p3#0", "length"),
    ]
    with pytest.raises(ConfigError, match="needs --price-in"):
        HarvestConfig(teacher="http://x", budget_usd=1.0)
    with pytest.raises(ConfigError, match="--commit-window"):
        HarvestConfig(teacher="http://x", commit_window_s=-1)
    # each of these used to be accepted: 400s from the teacher, a harvest that sent nothing, ...
    for bad, match in [
        ({"temperature": -1.0}, "--temperature -1.0"),
        ({"timeout_s": 0}, "--timeout 0"),
        ({"max_retries": -1}, "--max-retries -1"),
        ({"budget_tokens": -5}, "cannot be negative"),
    ]:
        with pytest.raises(ConfigError, match=match):
            HarvestConfig(teacher="http://x", **bad)


def test_a_store_that_is_not_ours_is_refused_and_left_as_it_was(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all")
    with pytest.raises(ConfigError, match="garbage.sqlite is not a readable response store"):
        ResponseStore(garbage)
    assert (
        garbage.read_bytes() == b"not a database at all"
    )  # it may hold paid answers: never touched
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE responses (id INTEGER, body TEXT)")
    with pytest.raises(ConfigError, match="not a distillguard response store"):
        ResponseStore(foreign)


def test_group_commit_is_one_transaction(tmp_path):
    store = ResponseStore(tmp_path / "store.sqlite")
    rows = [(f"fp{i}", f"p{i}", {"q": i}, {"a": i}, "ok", 3, 4, 0.0) for i in range(3)]
    with pytest.raises(sqlite3.Error):  # a bad row rolls back the whole group
        store.put_many(rows + [("fp9", "p9", {}, None, "ok", object(), 0, 0.0)])  # cannot be stored
    assert store.totals()["responses"] == 0
    store.put_many(rows)
    store.put(
        "fp0", "p0", {"q": 0}, {"a": 0}, "ok", prompt_tokens=3, completion_tokens=4, cost_usd=0.0
    )  # no twin
    assert ResponseStore(tmp_path / "store.sqlite").totals()["responses"] == 3
    # The teacher's raw answer (bytes or text) is stored as it came and reads back as the same object.
    raw = b'{"choices": [{"message": {"content": "h\\u00e9llo \xc3\xa9"}}], "usage": {"prompt_tokens": 3}}'
    store.put_many(
        [
            ("fp7", "p7", {"q": "é"}, raw, "ok", 3, 4, 0.0),
            ("fp8", "p8", {"q": 8}, raw.decode(), "ok", 3, 4, 0.0),
        ]
    )
    got = {r["fingerprint"]: r for r in store.records()}
    assert got["fp7"]["response"] == got["fp8"]["response"] == json.loads(raw)
    assert got["fp7"]["response"]["choices"][0]["message"]["content"] == "héllo é" and got["fp7"][
        "request"
    ] == {"q": "é"}


def test_prompt_sources(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,prompt\na,first\nb,second\n")
    assert [p.as_messages() for p in load_prompts(str(csv_path))] == [
        [{"role": "user", "content": "first"}],
        [{"role": "user", "content": "second"}],
    ]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
        )
        + "\n"
    )
    assert load_prompts(str(jl))[0].messages == (("system", "s"), ("user", "u"))
    share = load_prompts("sharegpt", limit=5, skip=2)
    assert len(share) == 5 and share[0].id == load_prompts("sharegpt", limit=3)[2].id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        load_prompts(str(bad))
    parts = tmp_path / "parts.jsonl"  # OpenAI's content parts, as exported chat logs have them
    parts.write_text(
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
                    }
                ]
            }
        )
        + "\n"
    )
    assert load_prompts(str(parts))[0].messages == (("user", "a b"),)
    for content in (
        None,
        5,
        [{"type": "image_url", "image_url": {"url": "x"}}],
    ):  # were sent as 'None', '5', "[{'type'..."
        bad.write_text(json.dumps({"messages": [{"role": "user", "content": content}]}) + "\n")
        with pytest.raises(
            ConfigError, match="bad.jsonl:1: a message's 'content' must be a string"
        ):
            load_prompts(str(bad))
    with pytest.raises(ConfigError, match="no such prompt source"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no prompts in .*empty.jsonl$"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(
        ConfigError, match=r"no prompts in .*p.csv \(skip 2\)"
    ):  # sliced past the end
        load_prompts(str(csv_path), skip=2)
    with pytest.raises(
        ConfigError, match="--skip -1"
    ):  # not the last prompt, as a Python slice would give
        load_prompts(str(csv_path), skip=-1)


def test_harvest_stores_every_answer_with_logprobs_and_resumes(teacher, tmp_path):
    key = make_key(teacher, "harvester")
    prompts = load_prompts(str(prompts_file(tmp_path, 8, "resume")))
    config = HarvestConfig(
        teacher=teacher[0],
        api_key=key,
        model="tiny",
        concurrency=4,
        max_tokens=400,
        temperature=1.0,
        top_logprobs=2,
        seed=0,
    )
    store = ResponseStore(tmp_path / "store.sqlite")
    seen = []  # progress is throttled, but its last call sees the final counts
    report = asyncio.run(
        harvest(config, prompts, store, on_progress=lambda r, b: seen.append(r.stored_ok))
    )
    assert (
        report.sent == 8
        and report.stored_ok + sum(report.malformed.values()) == 8
        and not report.failed
    )
    assert 1 <= len(seen) <= 9 and seen[-1] == report.stored_ok
    assert store.totals()["responses"] == 8
    data = tmp_path / "data.jsonl"
    n_rows = store.export_jsonl(data)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert n_rows == len(rows) == report.stored_ok
    for row in rows:
        assert row["response"] and row["logprobs"] and len(row["logprobs"][0]["top_logprobs"]) == 2
    again = asyncio.run(harvest(config, prompts, store))
    assert again.skipped_done == 8 and again.sent == 0
    assert set(generations(teacher[1], "harvester").values()) == {1}


def test_several_answers_per_request_are_counted_and_exported_one_by_one(teacher, tmp_path):
    key = make_key(teacher, "plural")
    prompts = load_prompts(str(prompts_file(tmp_path, 6, "plural")))
    config = HarvestConfig(
        teacher=teacher[0],
        api_key=key,
        model="tiny",
        concurrency=3,
        n=3,
        max_tokens=48,
        temperature=1.0,
        seed=1,
    )
    store = ResponseStore(tmp_path / "store.sqlite")
    report = asyncio.run(harvest(config, prompts, store))
    assert report.stored_ok + sum(report.malformed.values()) == 6 and not report.failed
    # every stored response accounts for its 3 choices, and exactly the usable ones are exported
    assert report.answers_ok + sum(report.answers_malformed.values()) == 18
    data = tmp_path / "data.jsonl"
    rows = (
        [json.loads(line) for line in data.read_text().splitlines()]
        if store.export_jsonl(data)
        else []
    )
    assert len(rows) == report.answers_ok
    statuses = [
        classify_choice(c) for r in store.records(only_ok=False) for c in r["response"]["choices"]
    ]
    assert statuses.count("ok") == report.answers_ok
    assert {r["prompt_id"] for r in rows} == {
        r["prompt_id"] for r in store.records()
    }  # the 'ok' responses


def test_budget_is_never_exceeded(teacher, tmp_path):
    key = make_key(teacher, "thrifty")
    prompts = load_prompts(str(prompts_file(tmp_path, 20, "budget")))
    config = HarvestConfig(
        teacher=teacher[0],
        api_key=key,
        model="tiny",
        concurrency=6,
        max_tokens=100,
        budget_tokens=2000,
        price_in=1.0,
        price_out=2.0,
    )
    store = ResponseStore(tmp_path / "store.sqlite")
    report = asyncio.run(harvest(config, prompts, store))
    assert store.totals()["tokens"] <= 2000
    assert report.budget_stopped > 0 and report.sent + report.budget_stopped == 20
    assert store.totals()["cost_usd"] == pytest.approx(
        (store.totals()["prompt_tokens"] * 1.0 + store.totals()["completion_tokens"] * 2.0) / 1e6
    )


def test_retries_honour_429(teacher, tmp_path):
    key = make_key(teacher, "squeezed", max_concurrent=1)
    prompts = load_prompts(str(prompts_file(tmp_path, 6, "retry")))
    config = HarvestConfig(
        teacher=teacher[0],
        api_key=key,
        model="tiny",
        concurrency=4,
        max_tokens=8,
        backoff_s=0.05,
        max_retries=20,
    )
    report = asyncio.run(harvest(config, prompts, ResponseStore(tmp_path / "store.sqlite")))
    assert report.retries > 0 and not report.failed
    assert report.stored_ok + sum(report.malformed.values()) == 6


def test_failed_requests_make_the_cli_exit_1_and_stop_the_pipeline_before_curate(
    teacher, tmp_path, monkeypatch
):
    """A key allowed 3 requests a minute, no retries: 3 answers, then 3 real 429s from the gateway."""
    from distillguard.distill.pipeline import load_config, run
    from distillguard.errors import IncompleteError

    path = prompts_file(tmp_path, 6, "rationed")
    cmd = distillguard_command(
        "distill",
        "harvest",
        "--teacher",
        teacher[0] + "/v1",
        "--prompts",
        str(path),
        "--out",
        str(tmp_path / "cli"),
        "--model",
        "tiny",
        "--concurrency",
        "1",
        "--max-tokens",
        "8",
        "--max-retries",
        "0",
    )
    env = {**os.environ, "DISTILLGUARD_TEACHER_API_KEY": make_key(teacher, "rationed-cli", rpm=3)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "3 of 6 teacher requests failed" in " ".join(
        done.stderr.split()
    )  # rich wraps long lines
    summary = json.loads(
        done.stdout.splitlines()[-1]
    )  # everything is still written before the exit
    assert summary["failed"] == {"http_429": 3} and summary["store"]["responses"] == 3
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["failed"] == {"http_429": 3}

    monkeypatch.setenv("DG_RATIONED_KEY", make_key(teacher, "rationed-run", rpm=3))
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "run"
    harvest_cfg = (
        f'teacher: "{teacher[0]}", api_key_env: DG_RATIONED_KEY, model: tiny, prompts: "{path}", '
        "max_tokens: 400, temperature: 1.0, seed: 1, concurrency: 1, max_retries: 0"
    )
    cfg.write_text(
        f"out: {out}\nharvest: {{{harvest_cfg}}}\n"
        "curate: {eval_fraction: 0.34, near_dup_threshold: null, min_chars: 1, drop_refusals: false}\n"
    )
    with pytest.raises(IncompleteError, match="3 of 6 teacher requests failed"):
        run(load_config(cfg), log=lambda *_: None)
    assert not (out / "curate").exists()  # nothing downstream of the partial harvest
    assert json.loads((out / "run.json").read_text())["harvest"]["failed"] == {"http_429": 3}
    cfg.write_text(
        cfg.read_text().replace("max_retries: 0", "max_retries: 0, allow_failures: true")
    )
    result = run(
        load_config(cfg), log=lambda *_: None
    )  # the window is still full: 3 more 429s, then curate
    assert result["harvest"]["failed"] == {"http_429": 3} and result["harvest"]["skipped_done"] == 3
    assert (
        result["curate"]["train"] + result["curate"]["eval"] == result["harvest"]["data_rows"] > 0
    )


def test_kill_mid_run_then_rerun_answers_each_prompt_exactly_once(teacher, tmp_path):
    key = make_key(teacher, "crashy")
    path = prompts_file(tmp_path, 30, "crash")
    out = tmp_path / "run"
    cmd = distillguard_command(
        "distill",
        "harvest",
        "--teacher",
        teacher[0] + "/v1",
        "--prompts",
        str(path),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--concurrency",
        "4",
        "--max-tokens",
        "64",
    )
    env = {**os.environ, "DISTILLGUARD_TEACHER_API_KEY": key}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # generous: the CLI imports transformers for --max-prompt-tokens' tokenizer before it sends
    deadline = time.monotonic() + 300
    stored = 0
    while stored < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with sqlite3.connect(out / "store.sqlite") as conn:
                stored = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.Error:
            pass
    assert proc.poll() is None, "the harvest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 8 <= stored < 30
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.splitlines()[-1])
    assert summary["store"]["responses"] == 30 and summary["skipped_done"] >= 8
    counts = generations(teacher[1], "crashy")
    assert len(counts) == 30 and set(counts.values()) == {1}  # every prompt answered, none twice


def test_sigterm_stores_the_answers_waiting_for_their_group_commit(teacher, tmp_path):
    """A 30 s commit window holds every answer in memory until the end; SIGTERM (kill, a container
    stop, timeout) must still store each one the teacher generated. Killed by SIGTERM before, the
    process took them with it."""
    path = prompts_file(tmp_path, 300, "sigterm")
    out = tmp_path / "run"
    cmd = distillguard_command(
        "distill",
        "harvest",
        "--teacher",
        teacher[0] + "/v1",
        "--prompts",
        str(path),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--concurrency",
        "4",
        "--max-tokens",
        "64",
        "--commit-window",
        "30",
    )
    env = {**os.environ, "DISTILLGUARD_TEACHER_API_KEY": make_key(teacher, "terminated")}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while (
        sum(generations(teacher[1], "terminated").values()) < 8
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.1)
    assert proc.poll() is None, "the harvest finished before it could be stopped"
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by SIGTERM" in " ".join(stderr.split())
    answered = generations(teacher[1], "terminated")
    assert 8 <= sum(answered.values()) < 300
    with sqlite3.connect(out / "store.sqlite") as conn:
        stored = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    # in flight when stopped: generated by the teacher but cancelled before the answer arrived
    # (the rerun gets those from the gateway's Idempotency-Key replay, without a second generation)
    assert sum(answered.values()) - 4 <= stored <= sum(answered.values())
    assert stored >= 8


def test_capped_answers_are_kept_only_when_asked_and_trained_without_an_end(
    teacher, tmp_path, monkeypatch
):
    """Answers cut at max_tokens: `harvest: {keep_capped: true}` carries them through harvest,
    curate and train, marked 'length'; the curate CLI drops them unless --keep-capped."""
    from datasets import load_from_disk

    from distillguard.distill.pipeline import load_config, run
    from tests.servers import run_cli

    monkeypatch.setenv("DG_TEST_KEY", make_key(teacher, "capped"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
out: {tmp_path / "run"}
harvest: {{teacher: "{teacher[0]}", api_key_env: DG_TEST_KEY, model: tiny, prompts: "{prompts_file(tmp_path, 6, "capped")}",
          max_tokens: 3, temperature: 1.0, seed: 2, keep_capped: true}}
curate: {{eval_fraction: 0.0, near_dup_threshold: null, drop_refusals: false}}
train: {{student: tiny, teacher: tiny, epochs: 1, batch_size: 2, loss: sft}}
""")
    result = run(load_config(cfg), log=lambda *_: None)
    data = tmp_path / "run" / "harvest" / "data.jsonl"
    reasons = [json.loads(line)["finish_reason"] for line in data.read_text().splitlines()]
    capped = reasons.count("length")
    assert (
        len(reasons) == result["harvest"]["data_rows"] == 6 and capped >= 4
    )  # 3 random tokens rarely end
    assert result["curate"]["train"] == 6 and result["train"]["steps"] >= 1
    assert sorted(
        load_from_disk(str(tmp_path / "run" / "curate"))["train"]["finish_reason"]
    ) == sorted(reasons)
    for flags, kept in [((), 6 - capped), (("--keep-capped",), 6)]:
        out = tmp_path / f"c{len(flags)}"
        res = run_cli(
            "distill",
            "curate",
            "--data",
            str(data),
            "--out",
            str(out),
            "--eval-fraction",
            "0",
            *flags,
        )
        assert res.returncode == 0, res.stderr
        report = json.loads((out / "curate_report.json").read_text())
        assert report["train"] == kept and report["removed"].get("capped", 0) == 6 - kept


def test_pipeline_runs_all_stages_then_caches_them(teacher, tmp_path, monkeypatch):
    from distillguard.distill.pipeline import load_config, run

    monkeypatch.setenv("DG_TEST_KEY", make_key(teacher, "pipeline"))
    path = prompts_file(tmp_path, 10, "pipeline")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
out: {tmp_path / "run"}
harvest: {{teacher: "{teacher[0]}", api_key_env: DG_TEST_KEY, model: tiny, prompts: "{path}", max_tokens: 400,
          temperature: 1.0, concurrency: 4, seed: 1, n: 2}}
curate: {{eval_fraction: 0.3, near_dup_threshold: null, min_chars: 1, drop_refusals: false}}
train: {{student: tiny, teacher: tiny, epochs: 1, batch_size: 4}}
eval: {{teacher: tiny, limit: 2, max_new_tokens: 8}}
""")
    first = run(load_config(cfg), log=lambda *_: None)
    assert first["harvest"]["sent"] == 10 and first["train"]["steps"] >= 1
    assert first["eval"]["student"]["nll"] > 0
    # both answers of a request come through: harvest -> data rows -> curated rows, none lost
    assert first["harvest"]["data_rows"] == first["harvest"]["answers_ok"] > 10
    assert first["curate"]["train"] + first["curate"]["eval"] == first["harvest"]["data_rows"]
    marks = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("stage.json")}
    assert len(marks) == 3
    second = run(load_config(cfg), log=lambda *_: None)
    assert second["harvest"]["sent"] == 0 and second["harvest"]["skipped_done"] == 10
    assert {p: p.stat().st_mtime_ns for p in marks} == marks  # nothing re-ran
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nharvest: {}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown sections"):
        load_config(bad)
    bad.write_text("out: x\nharvest: {teacher: t, prompts: self-instruct}\n")
    with pytest.raises(ConfigError, match="needs a `self_instruct:` section"):
        load_config(bad)
    # each of these was a traceback (TypeError, KeyError, AttributeError), some only after the harvest
    for text, match in [
        ("harvest: {teacher: t, prompts: p, bogus: 1}", r"unknown `harvest` settings \['bogus'\]"),
        ("harvest: [1, 2]", "`harvest:` must be a mapping"),
        ("harvest: {teacher: t}", "`harvest:` needs prompts"),
        ("harvest: {teacher: t, prompts: p}\neval: {limit: 3}", "needs a `train:` section"),
        ("harvest: {teacher: t, prompts: p}\ntrain: {lr: 0}", "`train:` --epochs 2.0 and --lr 0"),
        (
            "harvest: {teacher: t, prompts: p, n: abc}",
            "`harvest:` --n 'abc': input should be a valid",
        ),
        ("harvest: {teacher: t, prompts: p}\ntrain: {}\neval: {limit: 0}", "`eval:` --limit 0"),
        ("harvest: {teacher: t, prompts: p}\ncurate: {near_dup: 0.5}", "unknown `curate` settings"),
        (
            "harvest: {teacher: t, prompts: self-instruct}\nself_instruct: {novelty: 0}",
            "`self_instruct:` --novelty 0",
        ),
        (": : :", "not valid YAML"),
    ]:
        bad.write_text(f"out: x\n{text}\n")
        with pytest.raises(ConfigError, match=match):
            load_config(bad)
