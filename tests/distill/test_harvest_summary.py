"""What a harvest tells its user (issue 28): prompts over --max-prompt-tokens skipped and counted,
answers cut at --max-tokens named as such with the flag that keeps them, and what data.jsonl
holds (this run's answers, or the whole store) stated and selectable. A real tiny teacher behind
the guard, the real CLI in a subprocess."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from distillguard.distill.prompt_length import PromptTokenCounter
from distillguard.models import load_model
from tests.distill.test_harvest import generations, make_key
from tests.distill.test_harvest import teacher as teacher  # noqa: F401  (the module's fixture)
from tests.servers import run_cli


def write_prompts(path, prompts: dict[str, str]):
    path.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in prompts.items()))
    return path


def harvest(teacher, key: str, prompts, out, *flags: str):
    done = run_cli(
        "distill",
        "harvest",
        "--teacher",
        teacher[0],
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--temperature",
        "1.0",
        "--seed",
        "3",
        *flags,
        env={"DISTILLGUARD_TEACHER_API_KEY": key, "COLUMNS": "200"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return " ".join(done.stderr.split()), json.loads(done.stdout.splitlines()[-1])


def test_the_prompt_token_count_is_what_the_teacher_bills(teacher):
    """The cap counts a prompt as the teacher prefills it: the chat template's tokens, equal to
    the prompt_tokens the gateway reports for the same messages."""
    counter = PromptTokenCounter.load("tiny")
    key = make_key(teacher, "counter")
    for text in ("hi", "A longer question about counting tokens, é and 日本 included?"):
        messages = [{"role": "user", "content": text}]
        r = httpx.post(
            f"{teacher[0]}/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        assert counter.count(messages) == r.json()["usage"]["prompt_tokens"]
    # the same count the tokenizer gives through the loaded model's own chat rendering
    assert counter.count(messages) == len(load_model("tiny", device="cpu").chat_ids(messages))


def test_prompts_over_the_cap_are_skipped_and_counted_never_sent(teacher, tmp_path):
    counter = PromptTokenCounter.load("tiny")
    prompts = {f"short{i}": f"capped question {i}?" for i in range(4)}
    prompts |= {"long0": "a pasted document " * 20, "long1": "y" * 250}
    cap = 120
    lengths = {k: counter.count([{"role": "user", "content": v}]) for k, v in prompts.items()}
    assert {k for k, n in lengths.items() if n > cap} == {"long0", "long1"}, lengths
    path = write_prompts(tmp_path / "prompts.jsonl", prompts)
    key = make_key(teacher, "prompt-cap")
    said, summary = harvest(
        teacher,
        key,
        path,
        tmp_path / "h",
        "--max-tokens",
        "3",
        "--max-prompt-tokens",
        str(cap),
        "--tokenizer",
        "tiny",
    )
    assert f"skipped 2 of 6 prompts over --max-prompt-tokens {cap}" in said
    assert summary["over_prompt_cap"] == 2 and summary["sent"] == 4 and summary["planned"] == 6
    # the teacher never saw them: its ledger holds the four short prompts, once each
    assert sorted(generations(teacher[1], "prompt-cap")) == sorted(
        v for k, v in prompts.items() if k.startswith("short")
    )
    # Answers cut at --max-tokens are named as such, with the flag that keeps them, apart from
    # malformed ones (3 random tokens of the tiny model rarely end the answer).
    with sqlite3.connect(tmp_path / "h" / "store.sqlite") as conn:
        reasons = [
            c["finish_reason"]
            for (body,) in conn.execute("SELECT response FROM responses")
            for c in json.loads(body)["choices"]
        ]
    capped = reasons.count("length")
    assert capped >= 2
    assert (
        f"{capped} answers reached --max-tokens 3 (finish_reason length) and were dropped; "
        "--keep-capped keeps them" in said
    )
    assert "malformed" not in said
    assert summary["answers_capped"] == summary["export"]["capped"] == capped
    rows = (tmp_path / "h" / "data.jsonl").read_text().splitlines()
    assert len(rows) == summary["data_rows"] == 4 - capped
    # 0 lifts the cap: the long prompts go out on a rerun, the short ones are not sent again
    said, summary = harvest(
        teacher,
        key,
        path,
        tmp_path / "h",
        "--max-tokens",
        "3",
        "--max-prompt-tokens",
        "0",
        "--keep-capped",
    )
    assert summary["sent"] == 2 and summary["skipped_done"] == 4 and "skipped" not in said
    kept = summary["export"]["capped"]
    assert kept >= capped and f"{kept} answers reached --max-tokens 3" in said
    assert "are in data.jsonl (--keep-capped)" in said and summary["data_rows"] == 6


def test_data_jsonl_holds_this_runs_answers_unless_the_whole_store_is_asked_for(teacher, tmp_path):
    key = make_key(teacher, "export-scope")
    out = tmp_path / "h"
    first = write_prompts(tmp_path / "a.jsonl", {f"a{i}": f"first run {i}" for i in range(4)})
    _, one = harvest(teacher, key, first, out, "--max-tokens", "400")
    second = write_prompts(tmp_path / "b.jsonl", {f"b{i}": f"second run {i}" for i in range(3)})
    said, two = harvest(teacher, key, second, out, "--max-tokens", "400")
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in rows} <= {"b0", "b1", "b2"}
    assert len(rows) == two["data_rows"] == two["answers_ok"]
    assert two["export"]["other_rows"] == one["answers_ok"] > 0
    assert (
        f"data.jsonl: {len(rows)} rows: this run's usable answers ({one['answers_ok']} more "
        "from earlier runs in the store are not included; --export store includes them)" in said
    )
    said, everything = harvest(
        teacher, key, second, out, "--max-tokens", "400", "--export", "store"
    )
    assert everything["sent"] == 0
    rows = (out / "data.jsonl").read_text().splitlines()
    assert len(rows) == everything["data_rows"] == one["answers_ok"] + two["answers_ok"]
    assert f"data.jsonl: {len(rows)} rows: every usable answer in the store" in said
    done = run_cli(
        "distill", "harvest", "--teacher", teacher[0], "--prompts", str(second),
        "--out", str(out), "--export", "all",
    )  # fmt: skip
    assert done.returncode == 2 and "--export 'all'" in done.stderr


@pytest.mark.parametrize("bad", ["-1"])
def test_a_negative_cap_is_refused_naming_the_flag(bad, tmp_path):
    done = run_cli(
        "distill", "harvest", "--teacher", "http://127.0.0.1:9", "--prompts", "sharegpt",
        "--out", str(tmp_path), "--max-prompt-tokens", bad,
    )  # fmt: skip
    assert done.returncode == 2 and f"--max-prompt-tokens {bad}" in done.stderr


def test_a_prompt_repeated_in_one_run_is_asked_once(teacher, tmp_path):
    """ShareGPT's first 600 prompts repeat some word for word; their requests share a fingerprint,
    which is the Idempotency-Key, so concurrent copies got 409s until the harvest failed. Now a
    repeat is asked once, answered once, and said."""
    prompts = {f"p{i}": f"question number {i % 3}?" for i in range(9)}  # 3 distinct, 3 times each
    path = write_prompts(tmp_path / "prompts.jsonl", prompts)
    key = make_key(teacher, "repeats")
    said, summary = harvest(
        teacher, key, path, tmp_path / "h", "--max-tokens", "3", "--concurrency", "9"
    )
    assert summary["sent"] == 3 and summary["repeated"] == 6 and not summary["failed"]
    assert "6 prompts repeat an earlier prompt of this run word for word" in said
    assert sorted(generations(teacher[1], "repeats")) == [f"question number {i}?" for i in range(3)]
