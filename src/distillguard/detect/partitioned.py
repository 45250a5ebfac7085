"""Offline detection as a partitioned job on an out-of-core engine (DuckDB over Parquet).

``detect()`` (report.py) replays a traffic log in time order through one ``AccountMonitor``: one
process, every account's state in memory. This module computes the same detectors as stages
keyed the way a distributed engine shards them (docs/detection-at-scale.md), with DuckDB doing
the group-bys and window functions out of core (it spills to disk past ``memory_limit``):

1. **features, by row**: ``extract()`` and the prompt's LSH band keys per request, a map over
   the Parquet's row groups in worker processes, written as Parquet parts. Hand-written (the
   project's own Python, not SQL): the features parse an open-ended OpenAI body with the
   detectors' regular expressions and hashes, and one implementation for both paths cannot
   drift.
2. **per-account detectors, by account**: volume, timing, shape, template, cot and fresh as
   window functions ``PARTITION BY account ORDER BY ts``: each request's raw scores, then the
   calibrated tails (a vectorised Python UDF: the empirical tail and its fitted Pareto
   extrapolation are ours) and Fisher's combination, so every request has the score the replay
   gives it. Equal to the replay's per-account scores (``solo_score``, the account on its own
   requests): tests/detect/test_partitioned.py.
3. **near-duplicate groups, by LSH band**: the replay puts a prompt in the smallest group among
   the prompts before it that share one of its 10 band keys; that is a least fixpoint, reached by
   iterating a prefix minimum ``PARTITION BY band, key ORDER BY prompt``: the same groups.
4. **items and candidate pairs, by item**: each account's items (near-duplicate group, template
   used 3 times, system prompt, network) with the time it first held them; an item's first
   ``MAX_SHARERS + 1`` holders make pairs, as in the replay. Shared counts K per pair and kind
   are the replay's exactly.
5. **pair weights and communities**: the Poisson/Fisher weight of every pair with
   ``min_evidence`` shared items, on the whole period's popularity (the replay weighs a pair with
   the counts of the moment it last gained an item), then Leiden on the link graph, which is
   small (in memory).
6. **pooled scores, by community**: each community's members' requests merged in time order and
   scored like an account (stage 2 ``PARTITION BY community``); a member takes the pooled score
   in proportion to its own link evidence, as the replay does.

Stages 2-4 equal the replay; 5-6 are the batch version of an online computation (the replay
knows only the links made so far, and rebuilds a pooled stream from at most ``history``
requests per member), so a linked account's score can differ: the bench reports by how much.
"""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillguard.detect.calibrate import Calibration
from distillguard.detect.features import LARGE_MAX_TOKENS, extract
from distillguard.detect.fresh import binomial_evidence
from distillguard.detect.linking import (
    _BANDS,
    EDGE_MIN,
    KINDS,
    MAX_SHARERS,
    _network,
    attributed_share,
    communities,
    prompt_band_keys,
    prompt_words,
)
from distillguard.detect.monitor import _TailPvalue
from distillguard.detect.registry import select
from distillguard.detect.report import AccountResult
from distillguard.detect.timing import MIN_GAPS, WINDOW
from distillguard.detect.volume import BURST, DAY
from distillguard.errors import ConfigError

# the detectors stage 2 computes in SQL; linking comes from stages 3-5
STREAM_DETECTORS = ("volume", "timing", "shape", "template", "cot", "fresh")


# ---- stage 1: features, by row ----
def _feature_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("seq", pa.int64()),  # row in the log: ties in ts keep the file's order
            ("ts", pa.float64()),
            ("account", pa.string()),
            ("label", pa.string()),
            ("tokens", pa.int64()),
            ("continues", pa.bool_()),
            ("logprobs", pa.bool_()),
            ("big", pa.bool_()),  # max_tokens >= LARGE_MAX_TOKENS
            ("multi", pa.bool_()),  # n > 1
            ("cot", pa.bool_()),
            ("template", pa.string()),
            ("prompt_hash", pa.string()),
            # linking items (None: no item of that kind in this request)
            ("template_item", pa.string()),
            ("system_item", pa.string()),
            ("hash_item", pa.string()),
            ("network", pa.string()),
            ("bands", pa.list_(pa.uint64(), _BANDS)),
        ]
    )


def _features_part(args: tuple) -> int:
    """Stage 1 for a range of row groups: one Parquet part of features. Returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillguard.detect.parquet import read_traffic

    path, groups, offset, out, common = args
    schema = _feature_schema()
    cols: dict[str, list] = {name: [] for name in schema.names}
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        for seq, r in enumerate(read_traffic(path, row_groups=groups), start=offset):
            f = extract(r)
            words = prompt_words(f.prompt)
            row = {
                "seq": seq,
                "ts": f.ts,
                "account": f.account,
                "label": r.get("label"),
                "tokens": f.tokens,
                "continues": f.continues,
                "logprobs": f.logprobs,
                "big": (f.max_tokens or 0) >= LARGE_MAX_TOKENS,
                "multi": f.n > 1,
                "cot": f.cot,
                "template": f.template,
                "prompt_hash": f.prompt_hash,
                "template_item": f.template if f.template not in common else None,
                "system_item": f.system_hash if f.system_hash not in common else None,
                "hash_item": f.prompt_hash if not f.has_text and f.prompt_hash else None,
                "network": _network(f.ip),
                # the online linker's condition (Linker.observe)
                "bands": prompt_band_keys(words)
                if len(words) >= 8 and f.template not in common
                else None,
            }
            for k, v in row.items():
                cols[k].append(v)
            n += 1
            if len(cols["seq"]) >= 65_536:
                writer.write_table(pa.table(cols, schema=schema))
                for c in cols.values():
                    c.clear()
        if cols["seq"]:
            writer.write_table(pa.table(cols, schema=schema))
    return n


def write_features(path: str | Path, out_dir: Path, common: frozenset[str], workers: int) -> int:
    """Stage 1 over the whole file, its row groups split among ``workers`` processes."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    workers = max(1, min(workers, len(sizes)))
    cuts = np.linspace(0, len(sizes), workers + 1).round().astype(int).tolist()
    jobs = [
        (str(path), range(a, b), offsets[a], str(out_dir / f"part-{i:04d}.parquet"), common)
        for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
        if b > a
    ]
    if len(jobs) == 1:
        return _features_part(jobs[0])
    with ProcessPoolExecutor(len(jobs)) as pool:
        return sum(pool.map(_features_part, jobs))


# ---- stage 2 (and 6): the detectors of a stream, by its key ----
def _stream_sql(source: str, key: str, window: int) -> str:
    """Each request's raw detector scores in the stream ``key`` (an account, or a community),
    as the detectors compute them after observing it (volume.py, timing.py, shape.py,
    template.py, reasoning.py, fresh.py)."""
    return f"""
    WITH s AS (SELECT *, {key} AS skey FROM {source}),
    reuse AS (  -- template.py: a first turn whose skeleton the stream sent before with other words
        SELECT skey, seq, fill_again,
               fill_again AND row_number() OVER (
                   PARTITION BY skey, template, fill_again ORDER BY ts, seq) = 1 AS first_reuse
        FROM (SELECT skey, seq, ts, template, prompt_hash <> first_value(prompt_hash) OVER (
                  PARTITION BY skey, template ORDER BY ts, seq) AS fill_again
              FROM s WHERE NOT continues AND template IS NOT NULL)),
    a AS (
        SELECT s.skey, s.seq, s.ts, s.account,
            row_number() OVER w AS k,
            sum(s.tokens) OVER w AS cum_tokens,
            count(*) OVER (PARTITION BY s.skey ORDER BY s.ts
                RANGE BETWEEN UNBOUNDED PRECEDING AND {DAY} PRECEDING) AS day_old,
            coalesce(sum(s.tokens) OVER (PARTITION BY s.skey ORDER BY s.ts
                RANGE BETWEEN UNBOUNDED PRECEDING AND {DAY} PRECEDING), 0) AS day_old_tokens,
            count(*) OVER (PARTITION BY s.skey ORDER BY s.ts
                RANGE BETWEEN UNBOUNDED PRECEDING AND {BURST} PRECEDING) AS burst_old,
            s.ts - lag(s.ts) OVER w AS gap,
            sum(s.logprobs::INT) OVER w AS n_logprobs,
            sum(s.big::INT) OVER w AS n_big,
            sum(s.multi::INT) OVER w AS n_multi,
            sum((NOT s.continues)::INT) OVER w AS n_fresh,
            sum(s.cot::INT) OVER (PARTITION BY s.skey ORDER BY s.ts, s.seq
                ROWS BETWEEN {window - 1} PRECEDING AND CURRENT ROW) AS cot_hits,
            sum(coalesce(r.fill_again, false)::INT) OVER w AS reused,
            sum(coalesce(r.first_reuse, false)::INT) OVER w AS skeletons
        FROM s LEFT JOIN reuse r ON r.skey = s.skey AND r.seq = s.seq
        WINDOW w AS (PARTITION BY s.skey ORDER BY s.ts, s.seq ROWS UNBOUNDED PRECEDING)),
    b AS (
        SELECT *,
            max(k - burst_old) OVER w2 AS peak_burst,
            count(gap) OVER g AS n_gaps, sum(gap) OVER g AS gap_sum,
            sum(gap * gap) OVER g AS gap_sumsq
        FROM a
        WINDOW w2 AS (PARTITION BY skey ORDER BY ts, seq ROWS UNBOUNDED PRECEDING),
               g AS (PARTITION BY skey ORDER BY ts, seq
                     ROWS BETWEEN {WINDOW - 1} PRECEDING AND CURRENT ROW))
    SELECT skey, seq, account, k,
        greatest(log1p(k - day_old), log1p((cum_tokens - day_old_tokens) / 300.0),
                 log1p(4 * peak_burst)) AS volume,
        CASE WHEN n_gaps < {MIN_GAPS} THEN 0.0
             WHEN gap_sum <= 0 THEN -ln(1e-3)
             ELSE -ln(sqrt(greatest(gap_sumsq / n_gaps - (gap_sum / n_gaps) ^ 2, 0.0))
                      / (gap_sum / n_gaps) + 1e-3) END AS timing,
        k / (k + 8.0) * (n_logprobs / k + n_big / k + n_multi / k + n_fresh / k) AS shape,
        CASE WHEN n_fresh = 0 THEN 0.0
             ELSE n_fresh / (n_fresh + 16.0) * reused / n_fresh * (1.0 + log1p(skeletons)) END
            AS template,
        least(k, {window}) / (least(k, {window}) + 8.0) * cot_hits / least(k, {window}) AS cot,
        binomial_evidence(n_fresh::BIGINT, k) AS fresh
    FROM b"""


def _binomial_evidence(f, n):
    import pyarrow as pa

    return pa.array(
        [binomial_evidence(a, b) for a, b in zip(f.to_pylist(), n.to_pylist())], pa.float64()
    )


@dataclass
class Partitioned:
    """The job's result: per-account results as ``detect()`` gives them, plus the stages' tables
    the tests compare with the replay."""

    results: list[AccountResult]
    pairs: dict[tuple[str, str], dict[str, int]]  # pairs with min_evidence shared items: K per kind
    weights: dict[tuple[str, str], float]  # their -log10 p on the whole period's popularity
    communities: list[frozenset[str]]
    seconds: dict[str, float]
    counts: dict[
        str, int
    ]  # the linking's work: holdings, pair updates, pairs (bench/detect_scale.py)


def detect_partitioned(
    path: str | Path,
    calibration: Calibration,
    *,
    workers: int = 1,
    memory_limit: str = "2GB",
    tmp: str | Path | None = None,
) -> Partitioned:
    """Score a Parquet traffic log with the partitioned job (this module's docstring)."""
    import time

    import duckdb

    cfg = calibration.config
    names = [c.name for c in select(cfg.detectors)]  # the monitor's order (Fisher's sum)
    unknown = [n for n in names if n not in (*STREAM_DETECTORS, "linking")]
    if unknown:
        raise ConfigError(
            f"the partitioned job computes {', '.join(STREAM_DETECTORS)} and linking, not "
            f"{unknown}: calibrate with --detectors from those, or score with `detect`"
        )
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=tmp, prefix="dg-partitioned-") as work:
        work_dir = Path(work)
        feats = work_dir / "features"
        feats.mkdir()
        t = time.perf_counter()
        write_features(path, feats, calibration.common, workers)
        seconds["features"] = time.perf_counter() - t
        con = duckdb.connect(str(work_dir / "job.duckdb"))
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{work_dir / 'spill'}'")
        con.execute(f"SET threads = {max(1, workers)}")
        con.execute("SET preserve_insertion_order = false")
        _udfs(con, calibration)
        con.execute(
            f"CREATE TABLE req AS SELECT *, row_number() OVER (ORDER BY ts, seq) AS t "
            f"FROM read_parquet('{feats}/*.parquet')"
        )
        t = time.perf_counter()
        con.execute(f"CREATE TABLE own AS {_stream_sql('req', 'account', cfg.window)}")
        seconds["accounts"] = time.perf_counter() - t
        t = time.perf_counter()
        rounds = _groups(con)
        pairs, stats = _pairs(con, cfg.link_min_evidence)
        counts = _counts(con) | {"group_rounds": rounds, "candidate_pairs": len(pairs)}
        seconds["pairs"] = time.perf_counter() - t
        t = time.perf_counter()
        weights = _weights(pairs, stats)
        edges = {p: w for p, w in weights.items() if w >= EDGE_MIN}
        comms = [c for c in communities(edges) if len(c) > 1] if edges else []
        n_accounts = con.execute("SELECT count(DISTINCT account) FROM req").fetchone()[0]
        chance = math.log10(max(n_accounts * (n_accounts - 1) / 2, 1.0))
        evidence, share, community_of = {}, {}, {}
        adj: dict[str, dict[str, float]] = {}
        for (a, b), w in edges.items():
            adj.setdefault(a, {})[b] = w
            adj.setdefault(b, {})[a] = w
        for c in comms:
            for m in c:
                community_of[m] = c
                evidence[m] = sum(w for b, w in adj[m].items() if b in c)
                share[m] = attributed_share(evidence[m], chance)
        seconds["communities"] = time.perf_counter() - t
        t = time.perf_counter()
        results = _score(con, calibration, names, comms, evidence, share, cfg.window)
        seconds["scores"] = time.perf_counter() - t
        con.close()
    for r in results:
        c = community_of.get(r.account)
        r.cluster = f"cluster:{min(c)}" if c is not None and share[r.account] > 0 else None
    counts["edges"] = len(edges)
    return Partitioned(results, pairs, weights, comms, seconds, counts)


def _udfs(con, calibration: Calibration) -> None:
    """The calibrated tail of each detector and fresh.py's binomial tail as vectorised UDFs:
    scipy functions with no SQL equivalent."""
    import pyarrow as pa

    con.create_function(
        "binomial_evidence", _binomial_evidence, ["BIGINT", "BIGINT"], "DOUBLE", type="arrow"
    )

    def tail_p(tail):
        scalar = _TailPvalue(tail)

        def p(x):
            x = x.to_numpy(zero_copy_only=False)
            out = tail.pvalues(x)
            # beyond the benign data the replay's scalar form (same function, other rounding)
            beyond = np.flatnonzero(x > tail.sorted[-1]) if len(tail.sorted) else []
            for i in beyond:
                out[i] = scalar(float(x[i]))
            return pa.array(out)

        return p

    for name, tail in calibration.tails.items():
        con.create_function(f"p_{name}", tail_p(tail), ["DOUBLE"], "DOUBLE", type="arrow")
    # math.log1p as the detectors call it: a score equal to a benign sample must stay equal
    # (the empirical tail is a step function), so no other log1p's last bit
    con.create_function(
        "log1p",
        lambda x: pa.array([math.log1p(v) for v in x.to_pylist()], pa.float64()),
        ["DOUBLE"],
        "DOUBLE",
        type="arrow",
    )


# ---- stage 3: near-duplicate groups, by LSH band ----
def _groups(con) -> int:
    """``prompt_group(t, grp)``: the replay's near-duplicate group of each prompt (linking.py,
    ``Linker.observe``): the smallest group among earlier prompts sharing a band key, or the
    prompt's own number. Iterated to its fixpoint, each round one prefix minimum per bucket."""
    con.execute(
        "CREATE TABLE prompts AS SELECT t, row_number() OVER (ORDER BY t) AS p, bands "
        "FROM req WHERE bands IS NOT NULL"
    )
    con.execute(
        "CREATE TABLE bucket AS SELECT p, b.i AS band, bands[b.i + 1] AS key FROM prompts, "
        f"range({_BANDS}) b(i)"
    )
    con.execute("CREATE TABLE grp AS SELECT p, p AS g FROM prompts")
    rounds = 0
    while True:
        rounds += 1
        con.execute(
            """CREATE OR REPLACE TABLE grp2 AS
            SELECT grp.p, least(grp.g, coalesce(m.prev, grp.g)) AS g
            FROM grp LEFT JOIN (
                SELECT p, min(prev) AS prev FROM (
                    SELECT bucket.p, min(grp.g) OVER (PARTITION BY band, key ORDER BY bucket.p
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
                    FROM bucket JOIN grp USING (p))
                GROUP BY p) m USING (p)"""
        )
        changed = con.execute(
            "SELECT count(*) FROM grp JOIN grp2 USING (p) WHERE grp.g <> grp2.g"
        ).fetchone()[0]
        con.execute("DROP TABLE grp")
        con.execute("ALTER TABLE grp2 RENAME TO grp")
        if not changed:
            break
    con.execute("CREATE TABLE prompt_group AS SELECT t, g FROM prompts JOIN grp USING (p)")
    return rounds


def _counts(con) -> dict[str, int]:
    """What the replay's linker does per population: items held, pair updates (each holding
    updates its pair with every earlier holder among an item's first MAX_SHARERS + 1), pairs."""
    row = con.execute(
        """SELECT count(*), count(DISTINCT (kind, item)), sum(d - 1) FILTER (WHERE d <= h),
                  (SELECT count(*) FROM (SELECT DISTINCT a, b FROM pair_kind)),
                  (SELECT count(*) FROM prompt_group),
                  (SELECT count(DISTINCT g) FROM prompt_group)
           FROM holders"""
    ).fetchone()
    names = ("holdings", "items", "pair_updates", "pairs_sharing_an_item", "prompts", "groups")
    return dict(zip(names, map(int, row)))


# ---- stage 4: items and candidate pairs, by item ----
def _pairs(con, min_evidence: int):
    """Shared items K per pair and kind (pairs with ≥ ``min_evidence`` in all), and the
    popularity counts of the null (n and R per account and kind; D and U per kind)."""
    con.execute(
        """CREATE TABLE holds AS
        SELECT account, kind, item, min(t) AS t FROM (
            SELECT r.account, 'prompt' AS kind, 'g' || pg.g AS item, r.t
                FROM req r JOIN prompt_group pg USING (t)
            UNION ALL SELECT account, 'prompt', 'h' || hash_item, t FROM req
                WHERE hash_item IS NOT NULL
            UNION ALL SELECT account, 'template', template_item, t FROM (
                SELECT account, template_item, t, row_number() OVER (
                    PARTITION BY account, template_item ORDER BY t) AS uses
                FROM req WHERE template_item IS NOT NULL) WHERE uses = 3
            UNION ALL SELECT account, 'system', system_item, t FROM req
                WHERE system_item IS NOT NULL
            UNION ALL SELECT account, 'network', network, t FROM req WHERE network IS NOT NULL)
        GROUP BY account, kind, item"""
    )
    con.execute(
        f"""CREATE TABLE holders AS SELECT *,
            row_number() OVER (PARTITION BY kind, item ORDER BY t) AS d,
            least(count(*) OVER (PARTITION BY kind, item), {MAX_SHARERS + 1}) AS h
        FROM holds"""
    )
    # an item's first MAX_SHARERS + 1 holders pair up (Linker._hold)
    con.execute(
        f"""CREATE TABLE pair_kind AS
        SELECT least(x.account, y.account) AS a, greatest(x.account, y.account) AS b, x.kind,
               count(*) AS k
        FROM holders x JOIN holders y ON x.kind = y.kind AND x.item = y.item AND x.d < y.d
        WHERE y.d <= {MAX_SHARERS + 1}
        GROUP BY ALL"""
    )
    rows = con.execute(
        f"""SELECT a, b, kind, k FROM pair_kind JOIN (
            SELECT a, b FROM pair_kind GROUP BY a, b HAVING sum(k) >= {min_evidence}) USING (a, b)"""
    ).fetchall()
    pairs: dict[tuple[str, str], dict[str, int]] = {}
    for a, b, kind, k in rows:
        pairs.setdefault((a, b), {})[kind] = k
    per_account = {
        (a, kind): (n, r)
        for a, kind, n, r in con.execute(
            "SELECT account, kind, count(*), sum(h) FROM holders GROUP BY ALL"
        ).fetchall()
    }
    totals = {
        kind: (d, u)
        for kind, d, u in con.execute(
            "SELECT kind, count(*), count(DISTINCT item) FROM holds GROUP BY kind"
        ).fetchall()
    }
    return pairs, (per_account, totals)


# ---- stage 5: pair weights ----
def _weights(pairs, stats) -> dict[tuple[str, str], float]:
    """-log10 p of each pair (linking.py's null), vectorised over pairs, on the period's counts.
    In numpy rather than SQL: the Poisson and χ² tails are scipy's (``pdtrc``, ``chdtrc``), and
    the pairs that reach ``min_evidence`` are few (thousands per million requests)."""
    from scipy import special

    per_account, totals = stats
    keys = list(pairs)
    if not keys:
        return {}
    digits, held = [], []
    for kind in KINDS:
        d_total, u = totals.get(kind, (0, 0))
        na, ra = np.array([per_account.get((a, kind), (0, 0)) for a, _ in keys], float).T
        nb, rb = np.array([per_account.get((b, kind), (0, 0)) for _, b in keys], float).T
        k = np.array([pairs[p].get(kind, 0) for p in keys], float)
        denom = np.maximum(d_total - na - nb, 0) + u
        with np.errstate(divide="ignore", invalid="ignore"):
            ev = np.minimum(_poisson(k, nb * (ra - k) / denom), _poisson(k, na * (rb - k) / denom))
        h = (na > 0) & (nb > 0)  # the kinds both accounts hold count, K = 0 included (Fisher)
        digits.append(np.where(h, ev, 0.0))
        held.append(h)
    digits_sum = np.sum(digits, axis=0)
    dof = 2 * np.sum(held, axis=0)
    x = 2.0 * math.log(10) * digits_sum
    with np.errstate(divide="ignore"):
        w = -np.log10(np.maximum(special.chdtrc(np.maximum(dof, 1), x), 1e-300))
    w = np.where(np.isinf(digits_sum), np.inf, np.where(dof > 0, w, 0.0))
    return dict(zip(keys, w.tolist()))


def _poisson(k: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """linking.poisson_evidence, vectorised."""
    from scipy import special

    with np.errstate(divide="ignore", invalid="ignore"):
        tail = -np.log10(np.maximum(special.pdtrc(k - 1, np.maximum(lam, 1e-300)), 1e-300))
    return np.where(k <= 0, 0.0, np.where(lam <= 0, np.inf, tail))


# ---- stage 6: scores, by account and by community ----
def _combined(names: list[str], prefix: str, linking: str) -> str:
    """Fisher's -2 Σ ln p over the detectors, in the calibration's order (monitor.combined)."""
    terms = [
        f"ln(p_{n}({linking if n == 'linking' else prefix + n}))"
        for n in names
        if n != "linking" or linking
    ]
    return "-2.0 * (" + " + ".join(terms) + ")"


def _score(con, calibration, names, comms, evidence, share, window) -> list[AccountResult]:
    con.execute("CREATE TABLE member (account VARCHAR, community VARCHAR, ev DOUBLE, sh DOUBLE)")
    rows = [(m, min(c), evidence[m], share[m]) for c in comms for m in c]
    if rows:
        con.executemany("INSERT INTO member VALUES (?, ?, ?, ?)", rows)
    con.execute(
        "CREATE TABLE pooled AS "
        + _stream_sql(
            "(SELECT req.*, member.community FROM req JOIN member USING (account))",
            "community",
            window,
        )
    )
    threshold = calibration.threshold
    solo = _combined(names, "o.", "")
    own = _combined(names, "o.", "coalesce(m.ev, 0.0)")
    pool = _combined(names, "q.", "coalesce(lead_ev.ev, 0.0)")
    out = con.execute(
        f"""WITH v AS (
            SELECT o.account, o.k, {solo} AS solo, {own} AS own,
                   CASE WHEN q.seq IS NULL THEN NULL ELSE {pool} END AS pscore,
                   coalesce(m.sh, 0.0) AS sh
            FROM own o LEFT JOIN member m ON m.account = o.account
            LEFT JOIN pooled q ON q.seq = o.seq
            LEFT JOIN member lead_ev ON lead_ev.account = m.community),
        s AS (SELECT *, CASE WHEN pscore > own AND sh > 0 THEN own + sh * (pscore - own)
                             ELSE own END AS score FROM v)
        SELECT account, max(k), max(score), min(k) FILTER (WHERE score > $threshold),
               max(solo), min(k) FILTER (WHERE solo > $threshold)
        FROM s GROUP BY account""",
        {"threshold": threshold},
    ).fetchall()
    labels = dict(
        con.execute(
            "SELECT account, arg_min(label, t) FILTER (WHERE label IS NOT NULL) FROM req "
            "GROUP BY account"
        ).fetchall()
    )
    results = [
        AccountResult(
            account=a,
            score=score,
            flagged=flag_at is not None,
            flagged_at_request=flag_at,
            requests=n,
            label=labels.get(a),
            solo_score=solo_score,
            solo_flagged_at_request=solo_at,
        )
        for a, n, score, flag_at, solo_score, solo_at in out
    ]
    return sorted(results, key=lambda r: -r.score)


__all__ = ["Partitioned", "detect_partitioned", "write_features"]
