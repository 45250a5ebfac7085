"""Self-Instruct prompt generation through a real teacher server: parsing, filters, novelty, resume."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from rouge_score import rouge_scorer

from distillguard.distill import HarvestConfig, ResponseStore
from distillguard.distill.selfinstruct import (
    SEED_TASKS,
    NoveltyPool,
    SelfInstructConfig,
    answer_tasks,
    reject_reason,
    round_prompts,
    self_instruct,
    split_tasks,
)
from distillguard.errors import ConfigError
from tests.distill.test_harvest import ADMIN, generations, make_key
from tests.servers import run_cli, serve_process


def test_split_tasks_reads_a_continued_numbered_list():
    text = (
        "Write a limerick about a cat.\nTask 8: Name three rivers in Africa.\n  Here are three: Nile ...\n"
        "9. Convert 5 miles to kilometres.\n**Task 10:** Explain recursion"
    )
    assert split_tasks(text) == [
        "Write a limerick about a cat.",
        "Name three rivers in Africa.",
        "Convert 5 miles to kilometres.",
        "Explain recursion",
    ]
    assert split_tasks("") == [] and split_tasks("Task 3:") == []
    # An answer cut off at max_tokens loses its last task, which may be cut mid-sentence.
    record = {
        "response": {
            "choices": [
                {"message": {"content": "Say hi.\nTask 8: Describe the"}, "finish_reason": "length"}
            ]
        }
    }
    assert answer_tasks(record) == ["Say hi."]
    record["response"]["choices"][0]["finish_reason"] = "stop"
    assert answer_tasks(record) == ["Say hi.", "Describe the"]


def test_filters_drop_what_self_instruct_drops():
    config = SelfInstructConfig()
    assert reject_reason("Write a poem about autumn leaves.", config) is None
    assert reject_reason("Hi there", config) == "length"
    assert reject_reason(" ".join(["word"] * 151), config) == "length"
    assert reject_reason("Draw a picture of a horse.", config) == "blocked_word"
    assert reject_reason("Summarise the attached file for me.", config) == "blocked_word"
    assert (
        reject_reason("Explain the profile of a good manager.", config) is None
    )  # 'file' inside a word is fine
    assert reject_reason("- Write a poem about rain.", config) == "not_a_task_start"
    assert reject_reason("Écris un poème sur la pluie.", config) == "not_a_task_start"
    assert reject_reason("Write 水 水 水 水 水 水 水 水 水 水 水 水 水 水", config) == "non_english"
    with pytest.raises(ConfigError):
        SelfInstructConfig(novelty=0)
    with pytest.raises(ConfigError):
        SelfInstructConfig(seeds=())


def test_novelty_pool_agrees_with_rouge_l_on_every_pair():
    """The bag-of-words shortcut skips only pairs rouge_score would not have flagged."""
    rng = random.Random(0)
    words = "the a cat dog sat on mat write poem about rain list three rivers explain why sky blue".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(120)]
    sentences += [s + " today" for s in sentences[:20]]  # near-duplicates
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pool = NoveltyPool(0.7)
    flagged = 0
    for s in sentences:
        expected = any(scorer.score(o, s)["rougeL"].fmeasure > 0.7 for o in pool.tasks)
        assert pool.too_close(s) == expected, s
        flagged += expected
        pool.add(s)
    assert flagged >= 20  # the near-duplicates at least, so the check above saw both answers


def test_round_prompts_are_deterministic_and_mix_seeds_with_generated_tasks():
    config = SelfInstructConfig(requests_per_round=4)
    machine = ["Name a colour.", "Count to five.", "Spell 'cat'."]
    a, b = round_prompts(config, machine, 3), round_prompts(config, machine, 3)
    assert [p.messages for p in a] == [p.messages for p in b]
    assert [p.messages for p in a] != [p.messages for p in round_prompts(config, machine, 4)]
    text = a[0].messages[0][1]
    assert text.startswith("Come up with a series of tasks:") and text.endswith("Task 9:")
    assert sum(t in text for t in SEED_TASKS) == 6 and sum(t in text for t in machine) == 2


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('teacher') / 'ledger.db'}"
    with serve_process(
        "--model", "tiny", "--db", db, "--no-watermark", env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as url:
        yield url, db


def _run(config, hconfig, path):
    store = ResponseStore(path)
    try:
        return asyncio.run(self_instruct(config, hconfig, store))
    finally:
        store.close()


def test_a_rerun_sends_nothing_already_answered_and_rebuilds_the_same_pool(tiny_teacher, tmp_path):
    """The tiny random model writes bytes, so most candidates fail the filters: the test is about the
    rounds and the requests. Its ledger is the teacher's own count of what it answered."""
    url, db = tiny_teacher
    key = make_key(tiny_teacher, "self-instruct")
    seeds = ("a b c", "d e f", "g h i")  # short seeds the random answers can echo past the filters
    config = SelfInstructConfig(
        n=10_000,
        seeds=seeds,
        requests_per_round=4,
        max_rounds=2,
        min_words=1,
        human_per_prompt=2,
        machine_per_prompt=1,
    )
    hconfig = HarvestConfig(
        teacher=url, api_key=key, model="tiny", max_tokens=24, temperature=1.0, concurrency=4
    )
    tasks2, report2 = _run(config, hconfig, tmp_path / "store.sqlite")
    assert report2.rounds == 2 and report2.stopped == "max_rounds" and report2.harvest["sent"] == 8
    assert sum(generations(db, "self-instruct").values()) == 8
    longer = SelfInstructConfig(**{**config.__dict__, "max_rounds": 3})
    tasks3, report3 = _run(longer, hconfig, tmp_path / "store.sqlite")
    assert (
        report3.harvest["skipped_done"] == 8 and report3.harvest["sent"] == 4
    )  # only round 3 went out
    assert sum(generations(db, "self-instruct").values()) == 12
    assert (
        tasks3[: len(tasks2)] == tasks2
    )  # the first two rounds rebuilt from the store, identically
    again, _ = _run(longer, hconfig, tmp_path / "store.sqlite")
    assert again == tasks3 and sum(generations(db, "self-instruct").values()) == 12


def test_budget_stops_the_rounds(tiny_teacher, tmp_path):
    url, _ = tiny_teacher
    key = make_key(tiny_teacher, "self-instruct-budget")
    config = SelfInstructConfig(n=10_000, requests_per_round=4, max_rounds=50)
    hconfig = HarvestConfig(
        teacher=url, api_key=key, model="tiny", max_tokens=16, budget_tokens=6000, concurrency=2
    )
    _, report = _run(config, hconfig, tmp_path / "store.sqlite")
    assert report.stopped == "budget" and report.rounds < 50
    assert report.harvest["prompt_tokens"] + report.harvest["completion_tokens"] <= 6000


def test_a_round_with_failed_requests_stops_the_rounds_and_the_cli_exits_1(tiny_teacher, tmp_path):
    """A key allowed 3 requests a minute, no retries: round 1 gets 3 answers and one real 429. Before,
    the rounds went on (against a teacher that is down: max_rounds rounds of retries for nothing)."""
    url, db = tiny_teacher
    config = SelfInstructConfig(
        n=10_000,
        seeds=("a b c", "d e f", "g h i"),
        requests_per_round=4,
        max_rounds=5,
        min_words=1,
        human_per_prompt=2,
        machine_per_prompt=1,
    )  # listings within 512 tokens
    hconfig = HarvestConfig(
        teacher=url,
        api_key=make_key(tiny_teacher, "si-rationed", rpm=3),
        model="tiny",
        max_tokens=16,
        concurrency=1,
        max_retries=0,
    )
    _, report = _run(config, hconfig, tmp_path / "store.sqlite")
    assert report.stopped == "failed" and report.rounds == 1
    assert (
        "1 of 4 teacher requests failed (http_429 1)" in report.unfinished
        and "1 of them may succeed" in report.unfinished
    )
    assert (
        report.harvest["stored_ok"]
        + sum(v for k, v in report.harvest["malformed"].items() if not k.startswith("failed:"))
        == 3
    )
    assert sum(generations(db, "si-rationed").values()) == 3
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"prompt": t}) + "\n" for t in ("Say hi.", "Count to 3.", "Name a fruit.")
        )
    )
    res = run_cli(
        "distill",
        "self-instruct",
        "--teacher",
        url,
        "--api-key",
        make_key(tiny_teacher, "si-rat-cli", rpm=3),
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "si"),
        "--n",
        "50",
        "--requests-per-round",
        "4",
        "--max-rounds",
        "5",
        "--max-tokens",
        "16",
        "--concurrency",
        "1",
        "--max-retries",
        "0",
        "--seeds",
        str(seeds),
    )
    assert res.returncode == 1 and "round 1: 1 of 4 teacher requests failed" in " ".join(
        res.stderr.split()
    )
    assert (
        json.loads(res.stdout.strip().splitlines()[-1])["stopped"] == "failed"
    )  # the report is still written


def test_cli_writes_a_prompt_file_and_report(tiny_teacher, tmp_path):
    url, _ = tiny_teacher
    seeds = tmp_path / "seeds.jsonl"  # short: the tiny model's context is 512 tokens of bytes
    seeds.write_text(
        "".join(
            json.dumps({"prompt": t}) + "\n" for t in ("Say hi.", "Count to 3.", "Name a fruit.")
        )
    )
    res = run_cli(
        "distill",
        "self-instruct",
        "--teacher",
        url,
        "--api-key",
        make_key(tiny_teacher, "si-cli"),
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "si"),
        "--n",
        "3",
        "--requests-per-round",
        "2",
        "--max-rounds",
        "2",
        "--max-tokens",
        "16",
        "--seeds",
        str(seeds),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["store"]["responses"] == 4
    assert (tmp_path / "si" / "prompts.jsonl").is_file() and json.loads(
        (tmp_path / "si" / "report.json").read_text()
    )
    res = run_cli(
        "distill", "self-instruct", "--teacher", url, "--out", str(tmp_path / "x"), "--novelty", "0"
    )
    assert res.returncode == 2 and "--novelty" in res.stderr


@pytest.mark.slow
def test_the_bundled_teacher_writes_new_tasks_that_a_run_then_harvests(tmp_path):
    """``distill run`` with a ``self_instruct:`` section against the embedded teacher."""
    with serve_process("--no-guard", "--no-watermark", "--threads", "1") as url:
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"""
out: {tmp_path / "run"}
self_instruct: {{n: 6, requests_per_round: 8, max_tokens: 64, max_rounds: 3}}
harvest: {{teacher: "{url}", prompts: self-instruct, max_tokens: 256, concurrency: 6}}
curate: {{eval_fraction: 0.0, min_chars: 1, drop_refusals: false, near_dup_threshold: null}}
""")
        res = run_cli("distill", "run", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    report = json.loads((out / "self_instruct" / "report.json").read_text())
    tasks = [
        json.loads(line)["prompt"]
        for line in (out / "self_instruct" / "prompts.jsonl").read_text().splitlines()
    ]
    assert report["stopped"] == "done" and len(tasks) == 6, report
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pool = list(SEED_TASKS)
    for t in tasks:  # novel against the seeds and each other, and past the filters
        assert reject_reason(t, SelfInstructConfig()) is None
        assert max(scorer.score(o, t)["rougeL"].fmeasure for o in pool) <= 0.7, t
        pool.append(t)
    store = ResponseStore(out / "harvest" / "store.sqlite")
    asked = sorted(r["request"]["messages"][0]["content"] for r in store.records(only_ok=False))
    store.close()
    assert asked == sorted(tasks)  # the harvest asked exactly the new tasks
