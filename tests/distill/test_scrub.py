"""The scrubbing distiller: each edit fires at the rate it says, the same for a seed, leaves text
without words alone; mixing hits its share exactly; the outlier filter drops planted outliers."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from datasets import load_from_disk

from distillguard.distill.curate import REFUSAL, CurateConfig, curate
from distillguard.distill.scrub import (
    Scrub,
    SynonymTable,
    delete_words,
    edit_text,
    mix_count,
    other_answers,
    outliers,
    rarity_scores,
    reorder_sentences,
    scrub_records,
    substitute_words,
    swap_words,
    truncate_words,
)
from distillguard.errors import ConfigError
from tests.servers import run_cli

WORDS = [f"w{i}" for i in range(4000)]
TEXT = " ".join(WORDS)


def within_binomial(changed: int, trials: int, rate: float, sigmas: float = 4.5) -> bool:
    """|changed - n r| within 4.5 standard deviations (a miss has probability ~7e-6)."""
    return abs(changed - trials * rate) <= sigmas * math.sqrt(trials * rate * (1 - rate)) + 1


# A table whose neighbours are known: vectors on a circle, each word's nearest is the next one.
TABLE_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def table() -> SynonymTable:
    angles = [2 * math.pi * k / 24 for k in (0, 1, 6, 7, 12, 13)]
    return SynonymTable(TABLE_WORDS, [[math.cos(a), math.sin(a)] for a in angles])


def test_synonym_table_nearest_keeps_case_and_punctuation():
    t = table()
    assert t.neighbour("alpha") == "bravo" and t.neighbour("Delta") == "Charlie"
    assert t.neighbour("ECHO") == "FOXTROT" and t.neighbour("zulu") is None
    text, edits = substitute_words("(alpha), 42 zulu delta.", 1.0, random.Random(0), t)
    assert text == "(bravo), 42 zulu charlie." and (edits.trials, edits.changed) == (2, 2)


@pytest.mark.parametrize("rate", [0.05, 0.25, 0.5])
def test_each_edit_fires_at_its_rate(rate):
    rng = random.Random(1)
    out, e = delete_words(TEXT, rate, rng)
    assert e.trials == 4000 and len(out.split()) == 4000 - e.changed
    assert within_binomial(e.changed, e.trials, rate)
    kept = set(out.split())
    assert out.split() == [w for w in WORDS if w in kept]  # in order

    out, e = swap_words(TEXT, rate, rng)
    moved = sum(a != b for a, b in zip(out.split(), WORDS))
    assert sorted(out.split()) == sorted(WORDS) and moved == 2 * e.changed
    assert within_binomial(e.changed, e.trials, rate)

    words = [random.Random(k).choice(TABLE_WORDS + ["x1", "y2"]) for k in range(3000)]
    out, e = substitute_words(" ".join(words), rate, rng, table())
    changed = sum(a != b for a, b in zip(out.split(), words))
    assert e.trials == sum(w in TABLE_WORDS for w in words) and changed == e.changed
    assert within_binomial(e.changed, e.trials, rate)

    sentences = [f"Sentence number {k} ends here." for k in range(2000)]
    out, e = reorder_sentences(" ".join(sentences), rate, rng)
    got = re.split(r"(?<=\.) ", out)
    assert sorted(got) == sorted(sentences) and e.trials <= 1999
    assert sum(a != b for a, b in zip(got, sentences)) == 2 * e.changed
    assert within_binomial(e.changed, e.trials, rate)


def test_truncate_keeps_the_first_k_words_and_the_layout_between_them():
    assert truncate_words("a  b\nc d e", 3) == ("a  b\nc", truncate_words("a b c d e", 3)[1])
    assert truncate_words("a b c d e", 3)[1].changed == 2
    assert truncate_words("a b", 5)[0] == "a b"


def test_edits_are_deterministic_for_a_seed():
    scrub = Scrub(scrub_delete=0.2, scrub_swap=0.2, scrub_reorder=0.5, scrub_truncate=3000)
    one = edit_text(TEXT, scrub, random.Random("7:0"))[0]
    assert one == edit_text(TEXT, scrub, random.Random("7:0"))[0]
    assert one != edit_text(TEXT, scrub, random.Random("8:0"))[0]
    rows = [{"id": str(i), "messages": [], "response": TEXT} for i in range(3)]
    a, _ = scrub_records(rows, scrub)
    b, _ = scrub_records(rows, scrub)
    c, _ = scrub_records(rows, scrub.replace(scrub_seed=1))
    assert a == b and a != c
    assert a[0]["response"] != a[1]["response"]  # every row draws its own stream


@pytest.mark.parametrize("text", ["", "   ", "\n\n", " \t "])
def test_text_without_words_survives_every_edit(text):
    scrub = Scrub(
        scrub_delete=1, scrub_substitute=1, scrub_swap=1, scrub_reorder=1, scrub_truncate=1
    )
    out, edits = edit_text(text, scrub, random.Random(0), table())
    assert out.strip() == "" and all(e.changed == 0 for e in edits.values())


def test_mixing_reaches_the_share_exactly():
    rows = [
        {"id": f"t{i}", "messages": [{"role": "user", "content": f"q{i}"}], "response": "a"}
        for i in range(30)
    ]

    def others(n, prompts):
        assert "q3" in prompts
        return [
            {"id": f"o{k}", "messages": [], "response": "b", "source": "other"} for k in range(n)
        ]

    for share in (0.25, 0.5, 0.75):
        out, report = scrub_records(rows, Scrub(mix_other=share), others=others)
        n_other = sum(r.get("source") == "other" for r in out)
        assert n_other == report.mixed_in == mix_count(30, share)
        assert n_other / len(out) == share  # 10/40, 30/60, 90/120
    assert abs(mix_count(7, 0.3) / (7 + mix_count(7, 0.3)) - 0.3) <= 1 / 10


def test_other_answers_are_chatgpts_to_other_prompts_and_pass_curates_filters():
    got = other_answers(20, exclude_prompts={"hi"})
    assert len(got) == 20 and all(r["source"] == "other" for r in got)
    prompts = [" ".join(r["messages"][0]["content"].lower().split()) for r in got]
    assert "hi" not in prompts and len(set(prompts)) == 20
    assert not any(REFUSAL.search(r["response"][:400]) for r in got)


def test_the_outlier_filter_drops_planted_outliers():
    # 40 answers in one vocabulary and 3 planted in words nobody else uses
    rng = random.Random(0)
    common = "the model answers a question about data and code with a clear example".split()
    texts = [" ".join(rng.choice(common) for _ in range(40)) for _ in range(40)]
    planted = [0, 17, 40]
    for k, i in enumerate(planted):
        texts.insert(i, f"Zorblax kwentha {k} vlorp quindle smarth {k}")
    scores = rarity_scores(texts)
    assert outliers(scores, 3 / 43) == set(planted)
    rows = [{"id": str(i), "messages": [], "response": t} for i, t in enumerate(texts)]
    out, report = scrub_records(rows, Scrub(drop_outliers=3 / 43))
    assert report.dropped_ids == [str(i) for i in planted] and len(out) == 40
    assert outliers(scores, 0.0) == set()


def test_a_bad_setting_names_its_flag():
    with pytest.raises(ConfigError, match="--scrub-delete 1.5"):
        Scrub(scrub_delete=1.5)
    with pytest.raises(ConfigError, match="--mix-other 1"):
        Scrub(mix_other=1)
    with pytest.raises(ConfigError, match="--outlier-score 'length'"):
        Scrub(outlier_score="length")


def test_curate_scrubs_before_its_filters_and_reports_it(tmp_path):
    rows = [
        {
            "id": f"p{i}#0",
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": f"Question {i} about topic {i * 7}"}],
            "response": f"Answer {i}: " + " ".join(f"word{i}x{k}" for k in range(30)),
            "finish_reason": "stop",
        }
        for i in range(24)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(
        "distill",
        "curate",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "ds"),
        "--eval-fraction",
        "0",
        "--scrub-delete",
        "0.5",
        "--scrub-truncate",
        "10",
        "--mix-other",
        "0.5",
        "--drop-outliers",
        "0.25",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ds" / "curate_report.json").read_text())
    assert report["scrub"]["outliers_dropped"] == 6 and report["scrub"]["mixed_in"] == 18
    assert "scrubbed 24 teacher answers" in proc.stderr and "mixed in 18" in proc.stderr
    ds = load_from_disk(str(tmp_path / "ds"))["train"]
    teacher = [r for r in ds if r["prompt_id"].startswith("p")]
    assert len(ds) == 36 and len(teacher) == 18
    assert all(len(r["response"].split()) <= 10 for r in teacher)
    # the Python API the same, and without a scrub nothing changes
    train, _, plain = curate(rows, CurateConfig(eval_fraction=0))
    assert len(train) == 24 and "scrub" not in plain.to_dict()
