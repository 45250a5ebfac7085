"""Offline detection at provider scale (issue 23): wall time and peak memory of ``detect`` on
10k, 100k and 1M requests (20 per account on average: 500, 5k and 50k accounts), read from the
ledger-export Parquet shape.

A fast synthetic population in the ledger-export record shape, prompts cut from real ShareGPT
turns (the arena's pools), with the benign kinds of issue 23 and campaigns:

- ordinary users: requests per account lognormal (median ~12), each prompt a window of 8-80 words
  of a random turn of the eval pool (real text, mostly unique), 15% short (under 8 words);
- popular prompts: 10% of benign requests send one of 300 public prompts, Zipf-popular;
- apps: 5% of accounts belong to apps (one per 1,000 accounts) sharing a system prompt and
  a template filled with real text;
- NATs: 20% of accounts sit behind NATs of 100 accounts (one /24 each);
- heavy users: 1% of accounts send 15x as much;
- campaigns (0.5% of accounts): hydras of 20 keys (a shared system prompt and templates, proxy
  /24s, attack-pool prompts), bulk harvesters (2,000 requests, long answers), a logprob sweeper
  over the popular set (5% of all requests at 1M, top_logprobs 20).

Each size runs in fresh processes so that ``ru_maxrss`` is that size's peak: one generates and
writes the Parquet file, one calibrates on a separate benign population (seed + 1; not timed
with scoring) and scores the file with ``detect`` (the no-embedding detector set, as
bench/linking_eval.py). The embedding detectors' cost (MiniLM, the expensive part) is measured
separately on 10k requests of the same traffic, per request, with the default embedding budget.
The machine is shared: the 1-minute load average before and after each step is recorded.

``--partitioned-out FILE`` also scores each size's file with the partitioned job
(distillguard.detect.partitioned: DuckDB out of core, ``--workers`` processes for the features,
``--memory-limit`` for DuckDB) in its own fresh process, and compares it with the replay account
by account: the per-account scores (``solo_score``, the account on its own requests) and flags,
and the flags with linking.

    nice -n 5 .venv/bin/python bench/detect_scale.py --embedding-requests 0 \
        --out bench/results/detect_scale.json \
        --partitioned-out bench/results/detect_scale_duckdb.json
    nice -n 10 .venv/bin/python bench/detect_scale.py --sizes 10000 --calibration-requests 10000 \
        --embedding-requests 10000 --out bench/results/detect_scale_embeddings.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _provenance import code_version

DETECTORS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")
DAY = 86400.0
START = 1_780_000_000.0
TEMPLATES = (
    "Translate the following text into French: {}",
    "Summarize this in three bullet points: {}",
    "Write a product description based on these notes: {}",
    "Fix the grammar of the following paragraph: {}",
)
ATTACK_TEMPLATES = (
    "Explain in detail, step by step, the following: {}",
    "Give a complete and thorough answer with examples to: {}",
    "Write an expert-level response to the question below. {}",
)


class Population:
    """The synthetic traffic of one seed: ``records(n)`` yields about n requests in time order."""

    def __init__(self, n: int, seed: int, campaigns: bool = True):
        from distillguard.arena import load_pools

        pools = load_pools()
        self.rng = random.Random(seed)
        self.n = n
        self.benign_words = [t.split() for th in pools["eval"] for t in th.turns[0::2]]
        self.benign_words = [w for w in self.benign_words if len(w) >= 8]
        self.attack_words = [t.split() for th in pools["attack"] for t in th.turns[0::2]]
        self.attack_words = [w for w in self.attack_words if len(w) >= 8]
        popular = [
            " ".join(w[:60]) for w in self.benign_words[:: max(1, len(self.benign_words) // 300)]
        ]
        self.popular = popular[:300]
        weights = [1 / (i + 1) for i in range(len(self.popular))]  # Zipf, s = 1
        total = sum(weights)
        self.popular_cdf = [sum(weights[: i + 1]) / total for i in range(len(weights))]
        self.campaigns = campaigns

    def _window(self, words_list, lo: int = 8, hi: int = 80) -> str:
        w = self.rng.choice(words_list)
        k = self.rng.randint(min(lo, len(w)), min(hi, len(w)))
        i = self.rng.randint(0, len(w) - k)
        return " ".join(w[i : i + k])

    def _popular(self) -> str:
        import bisect

        return self.popular[bisect.bisect_left(self.popular_cdf, self.rng.random())]

    def _ip(self, prefix: str | None = None) -> str:
        r = self.rng
        if prefix is None:
            prefix = f"{r.randint(11, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}"
        return f"{prefix}.{r.randint(1, 254)}"

    def accounts(self):
        """(account, label, requests, prompt maker, ip maker, request extras) per account."""
        r = self.rng
        n_accounts = max(10, self.n // 20)
        attack = max(2, n_accounts // 200) if self.campaigns else 0
        benign = n_accounts - attack
        apps = [
            (
                f"You are the assistant of app {i}: answer briefly and politely. "
                + self._window(self.benign_words, 20, 40),
                TEMPLATES[i % len(TEMPLATES)],
            )
            for i in range(max(1, benign // 1000))
        ]
        nats = [self._ip().rsplit(".", 1)[0] for _ in range(max(1, benign // 500))]
        # requests per benign account: lognormal, scaled so the population sends about n
        raw = [r.lognormvariate(0, 1.1) * (15 if r.random() < 0.01 else 1) for _ in range(benign)]
        budget = self.n * (0.97 if self.campaigns else 1.0)
        scale = budget / sum(raw)
        for i, x in enumerate(raw):
            kind = r.random()
            app = apps[i % len(apps)] if kind < 0.05 else None
            nat = nats[i % len(nats)] if 0.05 <= kind < 0.25 else None
            fixed_ip = self._ip(nat)
            yield (f"b{i}", "benign", max(1, round(x * scale)), app, (lambda ip=fixed_ip: ip), {})
        if not attack:
            return
        remaining = self.n - budget
        sweep = max(50, round(remaining * 0.5))
        yield (
            "sweep-0",
            "logprobs",
            sweep,
            "popular",
            self._ip,
            {"logprobs": True, "top_logprobs": 20},
        )
        bulk = max(1, attack // 10)
        for j in range(bulk):
            yield (
                f"bulk-{j}",
                "bulk",
                max(50, round(remaining * 0.2 / bulk)),
                "attack",
                self._ip,
                {"max_tokens": 4096},
            )
        left = attack - 1 - bulk
        keys_total = max(1, left)
        per_key = max(20, round(remaining * 0.3 / keys_total))
        for h in range(math.ceil(keys_total / 20)):
            system = f"You are an expert assistant {h}. Answer thoroughly."
            proxies = [self._ip().rsplit(".", 1)[0] for _ in range(3)]
            for k in range(min(20, keys_total - 20 * h)):
                prefix = proxies[k % 3]
                yield (
                    f"hydra{h}-{k}",
                    "hydra",
                    per_key,
                    ("hydra", system),
                    (lambda p=prefix: self._ip(p)),
                    {"max_tokens": 2048},
                )

    def records(self):
        r = self.rng
        out = []
        for account, label, count, kind, ip, extra in self.accounts():
            days = 2.0
            start = START + r.uniform(0, days * DAY * 0.5)
            span = r.uniform(0.1, 1.0) * (START + days * DAY - start)
            for _ in range(count):
                system = None
                if kind == "popular":
                    text = self._popular()
                elif kind == "attack":
                    text = r.choice(ATTACK_TEMPLATES).format(self._window(self.attack_words))
                elif isinstance(kind, tuple) and kind[0] == "hydra":
                    system = kind[1]
                    text = r.choice(ATTACK_TEMPLATES).format(self._window(self.attack_words))
                elif isinstance(kind, tuple):  # an app: its system prompt and template
                    system, text = kind[0], kind[1].format(self._window(self.benign_words))
                elif r.random() < 0.1:
                    text = self._popular()
                elif r.random() < 0.15:
                    text = self._window(self.benign_words, 1, 7)
                else:
                    text = self._window(self.benign_words)
                messages = [{"role": "user", "content": text}]
                if system:
                    messages.insert(0, {"role": "system", "content": system})
                request = {"model": "teacher", "messages": messages, **extra}
                completion = int(r.lognormvariate(math.log(300 if label == "benign" else 900), 0.6))
                out.append(
                    {
                        "ts": round(start + r.random() * span, 3),
                        "account": account,
                        "ip": ip(),
                        "request": request,
                        "response": {
                            "status": 200,
                            "usage": {
                                "prompt_tokens": len(text) // 4 + 1,
                                "completion_tokens": completion,
                            },
                        },
                        "label": label,
                    }
                )
        out.sort(key=lambda rec: rec["ts"])
        return out


def peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def load() -> float:
    return round(os.getloadavg()[0], 2)


def step_generate(n: int, seed: int, path: str, campaigns: bool) -> dict:
    from distillguard.detect.parquet import write_traffic

    out = {"load_avg_1m": [load()]}
    t, cpu = time.perf_counter(), time.process_time()
    records = Population(n, seed, campaigns).records()
    out["generate_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    write_traffic(records, path)
    out["write_parquet_seconds"] = round(time.perf_counter() - t, 2)
    out["cpu_seconds"] = round(time.process_time() - cpu, 2)
    out["requests"] = len(records)
    out["accounts"] = len({r["account"] for r in records})
    out["parquet_mib"] = round(os.path.getsize(path) / 2**20, 1)
    out["peak_rss_mib"] = peak_mib()
    out["load_avg_1m"].append(load())
    return out


def _dump(results, path: str | None) -> None:
    """Each account's result, for the comparison of the two engines."""
    if path:
        rows = {
            r.account: [r.flagged_at_request, r.solo_score, r.solo_flagged_at_request, r.requests]
            for r in results
        }
        Path(path).write_text(json.dumps(rows))


def step_detect(path: str, cal_path: str, embeddings: bool, dump: str | None = None) -> dict:
    from distillguard.detect import Calibration, detect
    from distillguard.detect.parquet import read_traffic

    cal = Calibration.load(cal_path)
    out = {"load_avg_1m": [load()]}
    t, cpu = time.perf_counter(), time.process_time()
    report = detect(read_traffic(path), cal)
    out["seconds"] = round(time.perf_counter() - t, 2)
    out["cpu_seconds"] = round(time.process_time() - cpu, 2)
    out["peak_rss_mib"] = peak_mib()
    out["load_avg_1m"].append(load())
    results = report["results"]
    _dump(results, dump)
    out["requests"] = sum(r.requests for r in results)
    out["accounts"] = len(results)
    out["requests_per_s"] = round(out["requests"] / out["seconds"], 1)
    out["requests_per_cpu_s"] = round(out["requests"] / out["cpu_seconds"], 1)
    labels: dict[str, dict] = {}
    for r in results:
        row = labels.setdefault(r.label, {"accounts": 0, "flagged": 0})
        row["accounts"] += 1
        row["flagged"] += r.flagged
    out["labels"] = labels
    sizes = Counter(r.cluster for r in results if r.cluster)
    out["clusters"] = len(sizes)
    out["largest_clusters"] = sorted(sizes.values(), reverse=True)[:5]
    out["threshold"] = round(cal.threshold, 2)
    return out


def step_partitioned(path: str, cal_path: str, workers: int, memory: str, dump: str) -> dict:
    from distillguard.detect import Calibration
    from distillguard.detect.partitioned import detect_partitioned

    cal = Calibration.load(cal_path)
    out = {"load_avg_1m": [load()], "workers": workers, "memory_limit": memory}
    t, cpu = time.perf_counter(), time.process_time()
    job = detect_partitioned(path, cal, workers=workers, memory_limit=memory)
    out["seconds"] = round(time.perf_counter() - t, 2)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # this process (DuckDB's threads included) and the feature workers
    out["cpu_seconds"] = round(time.process_time() - cpu + children.ru_utime + children.ru_stime, 2)
    out["stage_seconds"] = {k: round(v, 2) for k, v in job.seconds.items()}
    # the larger of the job's process and its biggest worker (they do not overlap much: the
    # workers finish before DuckDB starts)
    out["peak_rss_mib"] = max(peak_mib(), round(children.ru_maxrss / 1024, 1))
    out["load_avg_1m"].append(load())
    out["requests"] = sum(r.requests for r in job.results)
    out["accounts"] = len(job.results)
    out["requests_per_s"] = round(out["requests"] / out["seconds"], 1)
    out["requests_per_cpu_s"] = round(out["requests"] / out["cpu_seconds"], 1)
    out["linking"] = job.counts
    out["communities"] = len(job.communities)
    labels: dict[str, dict] = {}
    for r in job.results:
        row = labels.setdefault(r.label, {"accounts": 0, "flagged": 0})
        row["accounts"] += 1
        row["flagged"] += r.flagged
    out["labels"] = labels
    _dump(job.results, dump)
    return out


def compare(replay_path: str, job_path: str) -> dict:
    """Account by account: the partitioned job against the replay."""
    a, b = json.loads(Path(replay_path).read_text()), json.loads(Path(job_path).read_text())
    assert a.keys() == b.keys()
    solo_equal = sum(
        a[k][3] == b[k][3]
        and math.isclose(a[k][1], b[k][1], rel_tol=1e-9, abs_tol=1e-9)
        and a[k][2] == b[k][2]
        for k in a
    )
    flags = Counter((a[k][0] is not None, b[k][0] is not None) for k in a)
    same_request = sum(a[k][0] is not None and a[k][0] == b[k][0] for k in a)
    return {
        "accounts": len(a),
        "per_account_detectors_equal": solo_equal,
        "flagged_by_both": flags[(True, True)],
        "flagged_by_replay_only": flags[(True, False)],
        "flagged_by_partitioned_only": flags[(False, True)],
        "flagged_at_the_same_request": same_request,
    }


def step_calibrate(n: int, seed: int, cal_path: str, embeddings: bool) -> dict:
    from distillguard.detect import DetectConfig, calibrate

    records = Population(n, seed, campaigns=False).records()
    t = time.perf_counter()
    names = () if embeddings else DETECTORS
    cal = calibrate(records, config=DetectConfig(detectors=names))
    cal.save(cal_path)
    return {
        "requests": len(records),
        "seconds": round(time.perf_counter() - t, 2),
        "threshold": round(cal.threshold, 2),
    }


def _duckdb_version() -> str:
    try:
        import duckdb
    except ImportError:
        return "(not installed)"
    return duckdb.__version__


def child(*args: str) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--step", *args], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"step {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--calibration-requests", type=int, default=100_000)
    ap.add_argument("--embedding-requests", type=int, default=10_000, help="0: skip")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--partitioned-out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2, help="feature processes of the job")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB's, for the job")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        name, *rest = args.step
        if name == "generate":
            out = step_generate(int(rest[0]), int(rest[1]), rest[2], rest[3] == "1")
        elif name == "calibrate":
            out = step_calibrate(int(rest[0]), int(rest[1]), rest[2], rest[3] == "1")
        elif name == "partitioned":
            out = step_partitioned(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
        else:
            out = step_detect(rest[0], rest[1], rest[2] == "1", *rest[3:])
        print(json.dumps(out))
        return
    tmp = Path(tempfile.mkdtemp(prefix="detect_scale_"))
    result = {
        "code_version": code_version(),
        "cpus": os.cpu_count(),
        "detectors": DETECTORS,
        "load_avg_1m_before": load(),
        "note": f"shared 2-core machine, run under nice -n {os.nice(0)}: wall seconds include other "
        "engineers' load (see load_avg_1m per step); cpu_seconds are this process's",
        "calibration": None,
        "sizes": {},
    }
    result["command"] = "python bench/detect_scale.py " + " ".join(sys.argv[1:])
    partitioned = {
        "bench": "detect_scale",
        "command": result["command"],
        "code_version": result["code_version"],
        "cpus": result["cpus"],
        "engine": "duckdb " + _duckdb_version(),
        "note": "the partitioned job (distillguard.detect.partitioned) on the same files and "
        "calibration as detect_scale.json, each in a fresh process; cpu_seconds include the "
        "feature workers and DuckDB's threads; against_replay compares it account by account "
        "with the replay of the same run",
        "sizes": {},
    }
    cal = str(tmp / "cal.npz")
    result["calibration"] = child(
        "calibrate", str(args.calibration_requests), str(args.seed + 1), cal, "0"
    )
    print("calibration", json.dumps(result["calibration"]), flush=True)
    for n in [int(x) for x in args.sizes.split(",")]:
        path = str(tmp / f"traffic_{n}.parquet")
        gen = child("generate", str(n), str(args.seed), path, "1")
        print(n, "generate", json.dumps(gen), flush=True)
        dump = str(tmp / f"replay_{n}.json")
        det = child("detect", path, cal, "0", dump)
        print(n, "detect", json.dumps(det), flush=True)
        result["sizes"][str(n)] = {"generate": gen, "detect": det}
        if args.out:  # partial results survive a later size's failure
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if args.partitioned_out:
            job_dump = str(tmp / f"partitioned_{n}.json")
            job = child("partitioned", path, cal, str(args.workers), args.memory_limit, job_dump)
            job["replay_cpu_seconds"] = det["cpu_seconds"]
            job["replay_peak_rss_mib"] = det["peak_rss_mib"]
            job["against_replay"] = compare(dump, job_dump)
            print(n, "partitioned", json.dumps(job), flush=True)
            partitioned["sizes"][str(n)] = job
            args.partitioned_out.write_text(json.dumps(partitioned, indent=1) + "\n")
        os.unlink(path)
    if args.embedding_requests:
        cal_e = str(tmp / "cal_embed.npz")
        n = args.embedding_requests
        result["embeddings"] = {
            "note": "every detector (MiniLM embeddings, default embedding budget), scored "
            "separately: the cost no-embedding runs above leave out",
            "calibration": child("calibrate", str(min(n, 20_000)), str(args.seed + 1), cal_e, "1"),
        }
        path = str(tmp / f"traffic_embed_{n}.parquet")
        result["embeddings"]["generate"] = child("generate", str(n), str(args.seed), path, "1")
        det = child("detect", path, cal_e, "1")
        det["cpu_ms_per_request"] = round(1000 * det["cpu_seconds"] / det["requests"], 2)
        result["embeddings"]["detect"] = det
        print("embeddings", json.dumps(result["embeddings"]), flush=True)
    result["load_avg_1m_after"] = load()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
