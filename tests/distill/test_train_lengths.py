"""`distill train` says what --max-length did to the training set (issue 28: 14 of 236 examples
were dropped without a word): examples whose prompt alone fills it are dropped, longer answers
are cut, and both are counted in the log, the JSON summary and the student's train_summary.json."""

from __future__ import annotations

import json
from collections import Counter

from distillguard.distill.curate import save_dataset
from distillguard.distill.examples import IGNORE, sft_example, topk_examples
from distillguard.models import load_model
from tests.servers import run_cli

MAX_LENGTH = 64


def rows_of(lm, prompts_and_answers):
    return [
        {
            "id": f"p{i}#0",
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": prompt}],
            "response": answer,
            "finish_reason": "stop",
            "logprobs": None,
        }
        for i, (prompt, answer) in enumerate(prompts_and_answers)
    ]


def test_sft_examples_count_what_max_length_drops_and_cuts():
    lm = load_model("tiny")
    stats: Counter = Counter()
    short = sft_example(lm, [{"role": "user", "content": "hi?"}], "yes", MAX_LENGTH, stats=stats)
    assert short is not None and not stats
    long_prompt = [{"role": "user", "content": "q" * MAX_LENGTH}]
    assert len(lm.chat_ids(long_prompt)) > MAX_LENGTH  # byte tokens: one per character at least
    assert sft_example(lm, long_prompt, "yes", MAX_LENGTH, stats=stats) is None
    cut = sft_example(lm, [{"role": "user", "content": "hi?"}], "a" * 100, MAX_LENGTH, stats=stats)
    assert len(cut["input_ids"]) == MAX_LENGTH and cut["labels"][-1] != IGNORE
    assert stats == {"dropped_long": 1, "truncated": 1}
    # top-k KD counts the same, and rows without logprobs apart, one entry per row
    rows = rows_of(lm, [("hi?", "yes")])
    ids = lm.tokenizer.encode("yes", add_special_tokens=False)
    entry = [
        {"bytes": list(lm.token_bytes[t]), "top_logprobs": [{"bytes": list(lm.token_bytes[t]), "logprob": -0.1}]}
        for t in ids
    ]  # fmt: skip
    rows[0]["logprobs"] = json.dumps(entry)
    rows += rows_of(lm, [("no logprobs", "yes")])
    kd_stats: Counter = Counter()
    examples = topk_examples(lm, rows, MAX_LENGTH, kd_stats)
    assert examples[0] is not None and examples[1] is None and kd_stats == {"no_logprobs": 1}


def test_train_reports_the_examples_max_length_dropped_and_cut(tmp_path):
    lm = load_model("tiny")
    rows = rows_of(
        lm,
        [(f"question {i}?", f"answer {i}.") for i in range(4)]  # fit
        + [("q" * 80, "dropped: its prompt alone is over 64 tokens")] * 2
        + [(f"long answer {i}?", "word " * 30) for i in range(3)],  # cut
    )
    save_dataset(rows, [], tmp_path / "data")
    res = run_cli(
        "distill", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s"),
        "--student", "tiny", "--teacher", "tiny", "--loss", "sft", "--epochs", "1",
        "--batch-size", "4", "--max-length", str(MAX_LENGTH), env={"COLUMNS": "200"}, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    said = " ".join(res.stderr.split())
    assert (
        f"7 examples of 9 rows: dropped 2 of 9 examples whose prompt alone fills --max-length "
        f"{MAX_LENGTH} (no answer token fits; raise --max-length to keep them); cut 3 answers at "
        f"--max-length {MAX_LENGTH}" in said
    )
    summary = json.loads(res.stdout.splitlines()[-1])
    saved = json.loads((tmp_path / "s" / "train_summary.json").read_text())
    for s in (summary, saved):
        assert s["examples"] == 7 and s["training_rows"] == 9
        assert s["dropped_over_max_length"] == 2 and s["truncated_at_max_length"] == 3
        assert s["config"]["max_length"] == MAX_LENGTH
    # nothing over the limit: nothing said
    res = run_cli(
        "distill", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s2"),
        "--student", "tiny", "--teacher", "tiny", "--loss", "sft", "--epochs", "1",
        "--batch-size", "4", "--max-length", "512", timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dropped" not in res.stderr and "cut " not in res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["examples"] == 9
