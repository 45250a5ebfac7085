"""The one JSONL reader: a record ends at "\\n" only; every bad line is an error naming path:line.

The separators below are the ones ``str.splitlines()`` splits at that JSON allows raw inside a
string (the C0 ones, \\v \\f \\x1c-\\x1e, must be escaped in JSON, so no writer leaves them raw).
Each writer of the project that leaves them raw (``ensure_ascii=False``) is read back here by the
reader that consumes its files."""

from __future__ import annotations

import io
import json

import pytest

from distillguard.errors import ConfigError, DataFileError
from distillguard.jsonl import iter_jsonl, read_jsonl, read_text_lines

SEPARATORS = ["\u2028", "\u2029", "\x85"]
TRICKY = "line one\u2028line two\u2029para\x85next"


@pytest.mark.parametrize("sep", SEPARATORS)
def test_separators_inside_strings_are_data(tmp_path, sep):
    recs = [{"prompt": f"before{sep}after", "n": 1}, {"prompt": "plain", "n": 2}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    assert sep in text and len(text.splitlines()) > 2  # the bug this reader exists for
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    assert read_jsonl(path) == recs
    assert [n for n, _ in iter_jsonl(path)] == [1, 2]
    # an open binary stream and a text stream (universal newlines: \n, \r, \r\n only) alike
    assert read_jsonl(io.BytesIO(text.encode())) == recs
    assert read_jsonl(io.StringIO(text)) == recs


def test_blank_lines_crlf_and_a_byte_order_mark_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}\n\n{"a": 3}')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2}), (6, {"a": 3})]


@pytest.mark.parametrize(
    "line,fragment",
    [
        ('{"a": 1,}', "d.jsonl:2: not valid JSON: Expecting property name enclosed in double"),
        ('{"a": 1', "d.jsonl:2: not valid JSON: Expecting ',' delimiter at column 8"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object, got an array"),
        ('"text"', "d.jsonl:2: expected a JSON object, got a string"),
        ("null", "d.jsonl:2: expected a JSON object, got null"),
        ("[" * 100_000, "d.jsonl:2: not valid JSON"),
    ],
)
def test_a_bad_line_is_an_error_naming_it(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text('{"ok": true}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        read_jsonl(path)
    assert fragment in str(info.value)
    assert isinstance(info.value, ConfigError) and info.value.line == 2


def test_bad_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(
        DataFileError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 11\)"
    ):
        read_jsonl(path)


def test_a_missing_file_and_text_lines(tmp_path):
    with pytest.raises(DataFileError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    txt = tmp_path / "p.txt"
    txt.write_text(f"  {TRICKY}  \n\nsecond\n", encoding="utf-8")
    assert read_text_lines(txt) == [TRICKY, "second"]


# ---- the project's writers that keep separators raw, read back by their readers ----------


def test_ledger_export_reads_back_through_import_and_detect(tmp_path):
    from distillguard.cli.detect import read_records
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import export_traffic, import_traffic

    records = [
        {
            "ts": 1000.0 + i,
            "account": "acme",
            "request": {"messages": [{"role": "user", "content": f"{TRICKY} {i}"}]},
            "response": {"status": 200, "text": f"answer{SEPARATORS[i % 3]}{i}"},
        }
        for i in range(6)
    ]
    src = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    migrate(src)
    assert import_traffic(src, [json.dumps(r, ensure_ascii=False) + "\n" for r in records]) == 6
    out = tmp_path / "export.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        assert export_traffic(src, fh) == 6
    assert "\u2028" in out.read_text(encoding="utf-8")
    back = read_records(str(out))
    assert [r["request"] for r in back] == [r["request"] for r in records]
    assert [r["response"]["text"] for r in back] == [r["response"]["text"] for r in records]
    dst = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(dst)
    with open(out, "rb") as fh:
        assert import_traffic(dst, fh, source=str(out)) == 6
    src.dispose()
    dst.dispose()


def test_harvest_store_and_self_instruct_files_read_back(tmp_path):
    from distillguard.distill.curate import read_jsonl as read_data
    from distillguard.distill.prompts import load_prompts
    from distillguard.distill.selfinstruct import write_prompts
    from distillguard.distill.store import ResponseStore

    write_prompts([f"{TRICKY} task {i}" for i in range(3)], tmp_path / "prompts.jsonl")
    prompts = load_prompts(str(tmp_path / "prompts.jsonl"))
    assert [p.messages[-1][1] for p in prompts] == [f"{TRICKY} task {i}" for i in range(3)]

    store = ResponseStore(tmp_path / "store.sqlite")
    for i in range(3):
        request = {"messages": [{"role": "user", "content": f"{TRICKY} {i}"}]}
        response = {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"ans\u2029wer {i}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
        store.put(
            f"fp{i}",
            f"p{i}",
            request,
            response,
            "ok",
            prompt_tokens=3,
            completion_tokens=2,
            cost_usd=0.0,
        )
    assert store.export_jsonl(tmp_path / "data.jsonl") == 3
    store.close()
    data = read_data(tmp_path / "data.jsonl")
    assert [d["messages"][0]["content"] for d in data] == [f"{TRICKY} {i}" for i in range(3)]
    assert [d["response"] for d in data] == [f"ans\u2029wer {i}" for i in range(3)]
