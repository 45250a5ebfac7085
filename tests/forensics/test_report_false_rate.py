"""The report's false-"distilled" rate, small: ``bench/forensics_false_rate.py``'s own code on a
handful of tiny suspects that were not distilled from the teacher (trained on ShareGPT slices
with their default controls; untrained).

At α = 1e-3 the number of false "distilled" verdicts among n null suspects is Binomial(n, ≤ α)
when the report is valid; its 99% quantile at these n is 0, so any false verdict fails (a valid
report fails this test with probability at most 1 - 0.999^3 = 0.3%).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from scipy.stats import binom

BENCH = Path(__file__).resolve().parents[2] / "bench" / "forensics_false_rate.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("forensics_false_rate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_null_suspects_are_not_called_distilled(tmp_path, monkeypatch):
    """The positive side (a distilled student reported distilled and traced) is
    tests/forensics/test_report.py's, and the bench's at its full size."""
    bench = load_bench()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # radioactivity, half the bench's time, left to the bench; a teacher trained less (it only
    # has to exist: nothing here is distilled from it)
    tests = ("identity", "similarity", "canaries")
    args = argparse.Namespace(alpha=1e-3, max_tokens=8, decoys=19, tests=tests)
    got = bench.measure(tmp_path, trained=2, untrained=1, distilled=0, args=args, teacher_epochs=2)
    nulls = got["runs"]
    bound = binom.ppf(0.99, len(nulls), args.alpha)
    assert bound == 0
    false = [r for r in nulls if r["verdict"] == "distilled"]
    assert len(false) <= bound, false
    for r in nulls:
        # every test ran: the verdict was decided by them, not by what was missing
        assert sorted(r["tests"]) == sorted(tests)
        assert all(t["could_run"] for t in r["tests"].values()), r["tests"]
        # the trained nulls got their default controls from their own train_summary.json
        assert r["default_controls"] == (r["kind"] == "trained")
        assert len(r["controls"]) == 2
    summary = got["summary"]
    assert summary["trained"]["n"] == 2 and summary["untrained"]["n"] == 1
    assert summary["trained"]["distilled"]["0.001"]["count"] == 0
    assert summary["trained"]["distilled"]["0.001"]["upper_95"] > 0.5  # two runs show little
