"""Traffic logs as Parquet: the ledger's export at provider scale (issue 23).

One row per request, the traffic-log record (DESIGN.md "Traffic log") as columns::

    ts: double   account: string   ip: string?   label: string?
    request: JSON   response: JSON?

``request`` and ``response`` stay JSON text (Parquet's JSON logical type, which DuckDB, Polars
and Spark read as JSON): an OpenAI request body is open-ended (content as a string, a list of
parts, or a ledger's ``{"sha256", "chars"}``; any field a client sends), and a fixed struct
schema would either drop what it did not foresee or fail on mixed types. The columns a
distributed engine partitions or filters by (``account``, ``ts``, ``ip``) are plain columns.
A record read back equals the record written, keys whose value was null left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from distillguard.errors import ConfigError

COLUMNS = ("ts", "account", "ip", "label", "request", "response")
ROW_GROUP = 65_536  # rows per row group and per write: bounded memory, big enough to compress


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("ts", pa.float64(), nullable=False),
            pa.field("account", pa.string(), nullable=False),
            pa.field("ip", pa.string()),
            pa.field("label", pa.string()),
            pa.field("request", pa.json_(pa.string()), nullable=False),
            pa.field("response", pa.json_(pa.string())),
        ]
    )


def is_parquet(path: str | Path) -> bool:
    """A Parquet file by its suffix or, failing that, its magic bytes."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def write_traffic(records: Iterable[dict], out: str | Path | IO[bytes]) -> int:
    """Write traffic records (in the order given) to a Parquet file or binary stream; returns
    how many. Streams in row groups, so an export of any size holds one group in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    n = 0
    cols: dict[str, list] = {c: [] for c in COLUMNS}

    def flush(writer) -> None:
        if cols["ts"]:
            writer.write_table(pa.table(cols, schema=schema), row_group_size=ROW_GROUP)
            for c in cols.values():
                c.clear()

    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for r in records:
            response = r.get("response")
            cols["ts"].append(float(r["ts"]))
            cols["account"].append(r["account"])
            cols["ip"].append(r.get("ip"))
            cols["label"].append(r.get("label"))
            cols["request"].append(json.dumps(r["request"], ensure_ascii=False))
            cols["response"].append(
                None if response is None else json.dumps(response, ensure_ascii=False)
            )
            n += 1
            if len(cols["ts"]) >= ROW_GROUP:
                flush(writer)
        flush(writer)
    return n


def read_traffic(
    path: str | Path, *, batch: int = ROW_GROUP, row_groups: range | None = None
) -> Iterator[dict]:
    """Traffic records from a Parquet file, in file order; a missing column or a bad row is a
    one-line ConfigError naming the file, the row and the fix. ``row_groups``: only those (a
    worker's share of a partitioned job, a range of row groups)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from None
    with pf:
        names = set(pf.schema_arrow.names)
        missing = [c for c in ("ts", "account", "request") if c not in names]
        if missing:
            raise ConfigError(
                f"{path}: Parquet traffic log lacks column(s) {missing}; write it with "
                "`distillguard ledger export -o FILE.parquet` (columns: " + ", ".join(COLUMNS) + ")"
            )
        cols = [c for c in COLUMNS if c in names]
        row = 0
        if row_groups is not None:  # rows numbered from the range's first group
            row = sum(pf.metadata.row_group(i).num_rows for i in range(row_groups.start))
            row_groups = list(row_groups)
        for rb in pf.iter_batches(batch_size=batch, columns=cols, row_groups=row_groups):
            data = rb.to_pydict()
            for i in range(rb.num_rows):
                row += 1
                ts, account, request = data["ts"][i], data["account"][i], data["request"][i]
                if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                    raise ConfigError(f"{path}: row {row}: 'ts' is {ts!r}, not epoch seconds")
                if not isinstance(account, str):
                    raise ConfigError(f"{path}: row {row}: 'account' is {account!r}, not a string")
                record: dict = {"ts": ts, "account": account, "request": _json(path, row, request)}
                if not isinstance(record["request"], dict):
                    raise ConfigError(f"{path}: row {row}: 'request' is not a JSON object")
                for key in ("ip", "label"):
                    value = data[key][i] if key in data else None
                    if value is not None:
                        record[key] = value
                response = data["response"][i] if "response" in data else None
                if response is not None:
                    record["response"] = _json(path, row, response)
                yield record


def _json(path, row: int, value):
    if isinstance(value, (dict, list)):  # a struct column written by another tool
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: row {row}: not valid JSON ({exc})") from None


__all__ = ["COLUMNS", "is_parquet", "read_traffic", "write_traffic"]
