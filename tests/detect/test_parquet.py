"""Traffic logs as Parquet (detect/parquet.py): every shape of record the traffic log allows comes
back as written."""

from __future__ import annotations

import pytest

from distillguard.detect import parquet
from distillguard.errors import ConfigError

RECORDS = [
    {
        "ts": 1732800000.25,
        "account": "acct-17",
        "ip": "10.1.2.3",
        "request": {
            "model": "m",
            "messages": [{"role": "user", "content": "Bonjour, ça va? 你好"}],
            "max_tokens": 512,
            "logprobs": True,
            "top_logprobs": 5,
        },
        "response": {"usage": {"prompt_tokens": 31, "completion_tokens": 212}},
        "label": "benign",
    },
    # OpenAI's list of content parts, and no optional field at all
    {
        "ts": 1732800001.0,
        "account": "acct-18",
        "request": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    },
    # a ledger kept as hashes: content is {"sha256", "chars"}; an unforeseen client field
    {
        "ts": 1732800002.5,
        "account": "acct-17",
        "ip": "2001:db8::1",
        "request": {
            "messages": [{"role": "user", "content": {"sha256": "ab" * 32, "chars": 40}}],
            "x_custom": [1, {"a": None}],
        },
        "response": {"status": 200, "text": None},
    },
]


def test_round_trip_keeps_every_record(tmp_path):
    path = tmp_path / "t.parquet"
    assert parquet.write_traffic(iter(RECORDS), path) == 3
    assert list(parquet.read_traffic(path)) == RECORDS
    assert parquet.is_parquet(path)


def test_many_row_groups_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet, "ROW_GROUP", 7)
    records = [dict(RECORDS[1], ts=float(i), account=f"a{i % 5}") for i in range(30)]
    path = tmp_path / "t.pq"
    parquet.write_traffic(records, path)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups == 5
    assert list(parquet.read_traffic(path, batch=4)) == records
    # workers of a partitioned job read ranges of row groups: together, the file in order
    parts = [list(parquet.read_traffic(path, row_groups=g)) for g in (range(2), range(2, 5))]
    assert parts[0] + parts[1] == records and len(parts[0]) == 14


def test_columns_a_distributed_engine_reads(tmp_path):
    """account, ts and ip are plain columns; request is Parquet's JSON type."""
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    parquet.write_traffic(RECORDS, path)
    schema = pq.ParquetFile(path).schema
    assert [c.name for c in schema] == list(parquet.COLUMNS)
    assert str(schema.column(4).logical_type) == "JSON"
    table = pq.read_table(path, columns=["account", "ts"])
    assert table.column("account").to_pylist() == ["acct-17", "acct-18", "acct-17"]


def test_bad_rows_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"ts": [1.0], "account": ["a"], "request": ["[1, 2]"]}), path)
    with pytest.raises(ConfigError, match=r"row 1: 'request' is not a JSON object"):
        list(parquet.read_traffic(path))
    pq.write_table(pa.table({"ts": [None], "account": ["a"], "request": ["{}"]}), path)
    with pytest.raises(ConfigError, match=r"row 1: 'ts' is None"):
        list(parquet.read_traffic(path))
