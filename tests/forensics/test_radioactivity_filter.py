"""The training-data n-gram filter of the radioactivity tests, where the truth is known: a small
n-gram language (tests/forensics/ngram_language.py) whose accounts' data carry their keys' green
lists, with two suspects: the language itself, which never saw any account's data but writes its
phrases, and a memoriser of one account's data (a student of exactly that data).
"""

from __future__ import annotations

import json

import pytest

from distillguard.errors import ConfigError, DataFileError
from distillguard.forensics import closed_test
from distillguard.forensics.training_filter import (
    filters_by_account,
    read_filter_data,
    training_filter,
)
from distillguard.models import load_tokenizer
from distillguard.watermark import WatermarkParams, account_key
from tests.forensics.ngram_language import NgramLanguage

SECRET = b"filter-test-secret"
# keyed-hash, gamma 0.25, a two-letter context: 676 contexts, of which one account's 16 texts
# hold about half, so the filter selects
PARAMS = WatermarkParams(delta=2.25, context_width=2)
TEXTS = 16


@pytest.fixture(scope="module")
def lang():
    return NgramLanguage(PARAMS)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def log10_p(tok, key, texts, **kw) -> float:
    return closed_test([key], texts, tok, **kw).keys[0].log10_p


def test_filtered_test_keeps_its_level_on_suspects_that_never_saw_the_data(lang, tok):
    """60 accounts, each with its own watermarked data as the filter, against a suspect that
    never saw any of it (but writes the same language): the count of p < 0.01 is consistent with
    1%, for the filter and for the filter minus the data's pairs. The filter is made of
    watermarked text, so this is the check that its selection does not leak the key."""
    suspect = lang.unwatermarked(TEXTS, seed=999)
    hits = {"filter": 0, "minus pairs": 0}
    for i in range(60):
        key = account_key(SECRET, f"acct-{i}", PARAMS)
        flt = training_filter(lang.watermarked(key.hash_key, TEXTS, seed=i), tok, 2)
        assert 0 < len(flt.contexts) < 26**2 * 0.7  # the filter selects
        hits["filter"] += log10_p(tok, key, suspect, filters=flt) < -2
        hits["minus pairs"] += log10_p(tok, key, suspect, filters=flt, exclude_data_pairs=True) < -2
    # P(Binomial(60, 0.01) >= 4) = 0.003
    assert hits["filter"] <= 3 and hits["minus pairs"] <= 3, hits


def test_filter_traces_a_student_of_the_data_at_a_smaller_p(lang, tok):
    """The memoriser of one account's data: the filter traces it at a smaller p than the
    unfiltered test on the same answers (the pairs in contexts the data never had are noise, and
    go). Dropping the data's own pairs as well leaves nothing to trace: a student of exactly the
    data is independent of the key given the data (the module docstring's proof); with half of
    the data in hand, the pairs of the other half carry it again."""
    key = account_key(SECRET, "leaker", PARAMS)
    data = lang.watermarked(key.hash_key, 2 * TEXTS, seed=1)
    student = lang.memoriser(data, 16, seed=3)
    full, half = training_filter(data, tok, 2), training_filter(data[:TEXTS], tok, 2)
    unfiltered = log10_p(tok, key, student)
    filtered = log10_p(tok, key, student, filters=full)
    assert unfiltered < -3, unfiltered
    assert filtered < unfiltered - 0.5, (filtered, unfiltered)
    assert log10_p(tok, key, student, filters=full, exclude_data_pairs=True) > -2
    assert log10_p(tok, key, student, filters=half, exclude_data_pairs=True) < -3
    # and the suspect that never saw it stays untraced with the same filter
    assert log10_p(tok, key, lang.unwatermarked(8, seed=4), filters=full) > -3


def test_filter_by_account_and_what_the_result_records(lang, tok, tmp_path):
    """A ledger export filters each account by its own answers (canaries skipped); an account
    with none runs unfiltered; the result records the data's SHA-256 and the units kept."""
    keys = [account_key(SECRET, a, PARAMS) for a in ("leaker", "bystander")]
    data = lang.watermarked(keys[0].hash_key, TEXTS, seed=1)
    export = tmp_path / "export.jsonl"
    rows = [{"account": "leaker", "response": {"text": t}} for t in data]
    rows.append({"account": "bystander", "response": {"text": "canary", "canary": True}})
    export.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    by_account, sha = read_filter_data(export)
    assert set(by_account) == {"leaker"}
    filters = filters_by_account(by_account, ["leaker", "bystander"], tok, 2, sha256=sha)
    result = closed_test(keys, lang.unwatermarked(TEXTS, seed=5), tok, filters=filters)
    rec = result.to_dict()["filter"]
    assert rec["ran"] and rec["sha256"] == sha and rec["accounts"]["bystander"] is None
    kept = rec["accounts"]["leaker"]["kept_units"]
    assert 0 < kept < rec["units_unfiltered"]
    by_key = {k.account: k for k in result.keys}
    assert by_key["leaker"].extra["scored"] == kept
    assert by_key["bystander"].extra["scored"] == rec["units_unfiltered"]


def test_bad_filter_input_is_a_clear_error(tok, tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_filter_data(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"account": "a", "request": {}}\n{"text": "   "}\n')
    with pytest.raises(DataFileError, match="no usable rows"):
        read_filter_data(empty)
    with pytest.raises(ConfigError, match="no text of more than"):
        training_filter(["ab"], tok, 2)
    synthid = account_key(SECRET, "a", WatermarkParams(scheme="synthid"))
    flt = training_filter(["abcdefgh"], tok, synthid.params.context_width)
    with pytest.raises(ConfigError, match="green-list scheme"):
        closed_test([synthid], ["abcdefgh"], tok, filters=flt)


def test_report_takes_each_accounts_served_answers_as_its_filter(lang, tok, tmp_path):
    """``forensics report --ledger``: each account's served answers (canaries left out) are its
    filter; SynthID runs unfiltered and evidence.json says why."""
    from sqlalchemy import insert

    from distillguard.forensics.report import ReportConfig, _ledger_answers, _report_filters
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.schema import LedgerRow

    answers = lang.watermarked(account_key(SECRET, "leaker", PARAMS).hash_key, 4, seed=1)
    rows = [
        {
            "request_id": f"r{i}",
            "ts": 0.0,
            "account_id": "leaker",
            "status": 200,
            "response_text": t,
            "policy_action": None,  # every row the same keys: executemany takes the first's
        }
        for i, t in enumerate(answers)
    ]
    rows.append(
        {
            "request_id": "c0",
            "ts": 0.0,
            "account_id": "bystander",
            "status": 200,
            "response_text": "a canary",
            "policy_action": "extracting:canary",
        }
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(insert(LedgerRow), rows)
    texts = _ledger_answers(engine)
    engine.dispose()
    assert texts == {"leaker": answers}
    config = ReportConfig(suspect="tiny", scheme="keyed-hash")
    filters, record = _report_filters(texts, "abc", ["leaker", "bystander"], tok, PARAMS, config)
    assert record["ran"] and set(filters) == {"leaker"}
    assert filters["leaker"].contexts == training_filter(answers, tok, 2).contexts
    synthid = WatermarkParams(scheme="synthid")
    filters, record = _report_filters(texts, "abc", ["leaker"], tok, synthid, config)
    assert filters is None and not record["ran"] and "SynthID" in record["why"]
