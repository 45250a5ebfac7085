"""Curation: each filter removes what it should and nothing else; the split never leaks a prompt."""

from __future__ import annotations

import json
import sys

import pytest
from datasets import load_from_disk

from distillguard.distill.curate import CurateConfig, curate, shingles
from distillguard.errors import ConfigError
from tests.servers import run_cli


def rec(pid: str, prompt: str, response: str, **extra) -> dict:
    return {
        "id": f"{pid}#0",
        "prompt_id": pid,
        "messages": [{"role": "user", "content": prompt}],
        "response": response,
        "finish_reason": "stop",
        **extra,
    }


QUESTIONS = [
    f"Explain how {topic} works in simple terms for a curious student"
    for topic in (
        "photosynthesis",
        "a bicycle gear",
        "the stock market",
        "a compiler",
        "vaccination",
        "a rainbow",
        "tidal power",
        "the internet",
        "a refrigerator",
        "democracy",
        "an electric motor",
        "memory in the brain",
    )
]


def test_filters_dedup_and_decontamination():
    records = [
        rec(f"p{i}", q, f"Here is an answer about item {i}.") for i, q in enumerate(QUESTIONS)
    ]
    records += [
        rec("dup", QUESTIONS[0], "Another answer."),  # exact duplicate prompt
        rec("near", QUESTIONS[1] + " please", "Near duplicate prompt."),  # near duplicate
        rec("refuse", "Write malware", "I'm sorry, but I can't help with that."),  # refusal
        rec("empty", "Say nothing", "   "),  # too short
        rec("cut", "Long story", "Once upon a time", finish_reason="length"),  # truncated
        {"id": "bad", "messages": [], "response": None},  # malformed
        {"id": "no-prompt", "response": "An answer to nothing."},  # malformed (was a KeyError)
        {"id": "str-prompt", "messages": "hi", "response": "An answer to a string."},  # malformed
        rec("contam", "What is the boiling point of water at sea level in Celsius?", "100 C."),
        rec("long", "Tell me", "x" * 5000),
    ]
    train, evaluation, report = curate(
        records,
        CurateConfig(max_chars=1000, eval_fraction=0.0),
        eval_prompts=["What is the boiling point of water at sea level, in Celsius?"],
    )
    assert report.removed == {
        "duplicate": 1,
        "near_duplicate": 1,
        "refusal": 1,
        "too_short": 1,
        "malformed": 3,
        "capped": 1,
        "contaminated": 1,
        "too_long": 1,
    }
    assert len(train) == len(QUESTIONS) and evaluation == [] and report.read == len(records)
    # keep_capped keeps the answer cut at max_tokens, and only it, marked for training without an end
    train, _, report = curate(
        records,
        CurateConfig(max_chars=1000, eval_fraction=0.0, keep_capped=True),
        eval_prompts=["What is the boiling point of water at sea level, in Celsius?"],
    )
    assert "capped" not in report.removed and len(train) == len(QUESTIONS) + 1
    assert [r["finish_reason"] for r in train if r["prompt_id"] == "cut"] == ["length"]


def test_answers_of_one_request_are_siblings_not_duplicates():
    """``n`` answers to one prompt id share their prompt; deduplicating on the prompt keeps them all
    and still drops the same question asked under another id (exactly or nearly)."""
    records = [
        {**rec(f"p{i}", q, f"answer {k} about item {i}"), "id": f"p{i}#{k}"}
        for i, q in enumerate(QUESTIONS[:4])
        for k in range(3)
    ]
    records += [
        rec("again", QUESTIONS[0], "asked twice"),
        rec("near", QUESTIONS[1] + " please", "nearly twice"),
    ]
    train, _, report = curate(records, CurateConfig(eval_fraction=0.0))
    assert len(train) == 12 and report.removed == {"duplicate": 1, "near_duplicate": 1}
    # on responses, a sibling that repeats an answer word for word is a duplicate all the same
    twins = [{**rec("p0", QUESTIONS[0], "same answer"), "id": f"p0#{k}"} for k in range(2)]
    train, _, report = curate(
        twins + [rec("p1", QUESTIONS[1], "other")],
        CurateConfig(eval_fraction=0.0, dedup_on="response"),
    )
    assert len(train) == 2 and report.removed == {"duplicate": 1}


def test_verifier_hook_and_split_by_prompt(tmp_path, monkeypatch):
    (tmp_path / "checks.py").write_text(
        "def even(record):\n    return int(record['response']) % 2 == 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [
        rec(f"p{i // 2}", f"question number {i // 2} about topic {i // 2}", str(i))
        for i in range(200)
    ]
    train, evaluation, report = curate(
        records,
        CurateConfig(
            verifier="checks:even", near_dup_threshold=None, dedup_on="response", eval_fraction=0.3
        ),
    )
    assert report.removed == {"verifier": 100}
    assert all(int(r["response"]) % 2 == 0 for r in train + evaluation)
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evaluation}
    assert 0.15 < len(evaluation) / 100 < 0.45
    with pytest.raises(ConfigError, match="cannot load verifier"):
        curate(records[:1], CurateConfig(verifier="checks:missing"))
    sys.modules.pop("checks", None)


def test_settings_that_cannot_mean_anything_are_refused():
    for bad, match in [
        ({"near_dup_threshold": 5.0}, "--near-dup 5.0"),
        ({"eval_fraction": 1.0}, "--eval-fraction"),
        ({"decontam_threshold": 0.0}, "decontam_threshold 0.0"),
        ({"min_chars": 10, "max_chars": 5}, "--max-chars 5 is below --min-chars 10"),
    ]:
        with pytest.raises(ConfigError, match=match):
            CurateConfig(**bad)


def test_shingles():
    assert (
        shingles("a b c d") == {"a b c", "b c d"}
        and shingles("Hi") == {"hi"}
        and shingles("") == set()
    )


def test_cli_writes_a_loadable_dataset(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps(rec(f"p{i}", q, f"answer {i}")) + "\n" for i, q in enumerate(QUESTIONS))
    )
    proc = run_cli(
        "distill",
        "curate",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "ds"),
        "--eval-fraction",
        "0.25",
    )
    assert proc.returncode == 0, proc.stderr
    ds = load_from_disk(str(tmp_path / "ds"))
    assert len(ds["train"]) + len(ds["eval"]) == len(QUESTIONS)
    assert ds["train"][0]["messages"][0]["role"] == "user"
    assert json.loads((tmp_path / "ds" / "curate_report.json").read_text())["read"] == len(
        QUESTIONS
    )
