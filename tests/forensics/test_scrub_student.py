"""``bench/scrub_student.py``'s own parts on small inputs: the tiny teacher restricted to a
lexicon writes only its words, and its SynthID harvest traces to the distiller's key and not to
another account's (the truth the bench's student measurements start from)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from distillguard.forensics import generate_answers
from distillguard.models import load_model
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.synthid import SynthIDTopK

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scrub_student.py"
WORDS = (
    "the rain tea ships jazz bread stars think thin ten about after again below could every "
    "first found great house large learn never other place plant point right small sound spell "
    "still study their there these thing three water where which world would write year"
).split()
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
PROMPTS = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 2)]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scrub_student", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harvest(bench):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread spins least
    try:
        teacher = load_model("tiny", device="cpu")
        params = WatermarkParams(scheme="synthid")
        keys = [account_key(b"scrub-student-test", a, params) for a in ("distiller", "other")]
        answers = generate_answers(
            teacher,
            PROMPTS,
            max_new_tokens=64,
            temperature=1.0,
            seed=1,
            logits_processors=[bench.LexiconOnly(bench.Lexicon(WORDS), teacher.vocab_size)],
            after_temperature=[SynthIDTopK(keys[0].hash_key, params.synthid)],
            progress=False,
        )
        yield teacher, params, keys, answers
    finally:
        torch.set_num_threads(threads)


def test_the_lexicon_teacher_writes_only_lexicon_words(bench, harvest):
    _, _, _, answers = harvest
    lexicon = bench.Lexicon(WORDS)
    for a in answers:
        words = a.split(" ")
        assert len(words) > 5, a
        assert all(w in WORDS for w in words[:-1]), a
        # the last word may be cut by max_new_tokens: a prefix of a lexicon word
        assert words[-1].encode() in lexicon.next or words[-1] in WORDS, a
    assert len({w for a in answers for w in a.split()}) > 5  # not one word over and over


def test_the_harvest_traces_to_the_distillers_key_only(bench, harvest):
    teacher, params, keys, answers = harvest
    rows = [
        {"messages": [{"role": "user", "content": p}], "response": a}
        for p, a in zip(PROMPTS, answers)
    ]
    right, wrong = bench.text_evidence(teacher.tokenizer, keys, params, rows)
    assert right < -4 and wrong > -3, (right, wrong)
