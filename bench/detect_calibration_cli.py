"""What a user of the CLI sees when calibrating detection on a small or a larger benign sample.

The provider's journey, as the README gives it, at several calibration sizes: for each size,
``distillguard arena traffic -b SIZE --pool calibration`` then ``distillguard detect --traffic
EVAL --calibrate ... --json``, both as subprocesses, on one evaluation file with a plain bulk
harvester and a slow one (``-c bulk -c slowlow``, the eval pool, another seed). Recorded per
size: the threshold, the too-small warning the user was shown (stderr), each campaign's score
and the request it was first flagged at, and how many benign accounts were flagged.

The detectors are those without embeddings (as bench/detect_fpr.py's runs): MiniLM on this
2-core machine took 36 minutes for the 400-user size alone.

    nice -n 10 python bench/detect_calibration_cli.py --out bench/results/detect_calibration_cli.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _provenance import code_version

DETECTORS = "volume,timing,shape,template,cot,fresh,linking"


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distillguard.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def labels_of(path: Path) -> dict[str, str]:
    labels = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            labels[record["account"]] = record["label"]
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 1600])
    ap.add_argument("--calibration-seed", type=int, default=1)
    ap.add_argument("--eval-seed", type=int, default=2)
    ap.add_argument("--eval-benign", type=int, default=100)
    ap.add_argument("--detectors", default=DETECTORS)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ev = tmp / "eval.jsonl"
        cli(
            "arena", "traffic", "-b", str(args.eval_benign), "-c", "bulk", "-c", "slowlow",
            "--seed", str(args.eval_seed), "-o", str(ev),
        )  # fmt: skip
        labels = labels_of(ev)
        for size in args.sizes:
            cal = tmp / f"cal{size}.jsonl"
            cli(
                "arena", "traffic", "-b", str(size), "--pool", "calibration",
                "--seed", str(args.calibration_seed), "-o", str(cal),
            )  # fmt: skip
            t0 = time.monotonic()
            done = cli(
                "detect", "--traffic", str(ev), "--calibrate", str(cal),
                "--detectors", args.detectors, "--json",
            )  # fmt: skip
            report = json.loads(done.stdout)
            # the warning as the user read it (rich may wrap it), up to the next progress line
            warning = None
            if "warning:" in done.stderr:
                rest = done.stderr.split("warning:", 1)[1]
                for stop in ("\nscoring", "\ncalibrat"):
                    rest = rest.split(stop, 1)[0]
                warning = " ".join(rest.split())
            campaigns = {
                labels[a["account"]]: {
                    "score": round(a["score"], 2),
                    "flagged": a["flagged"],
                    "flagged_at_request": a["flagged_at_request"],
                }
                for a in report["accounts"]
                if labels.get(a["account"], "benign") != "benign"
            }
            benign = [a for a in report["accounts"] if labels.get(a["account"]) == "benign"]
            runs.append(
                {
                    "benign_accounts": size,
                    "threshold": round(report["threshold"], 2),
                    "warning": warning,
                    "campaigns": campaigns,
                    "benign_flagged": sum(a["flagged"] for a in benign),
                    "benign_scored": len(benign),
                    "benign_top_score": round(max(a["score"] for a in benign), 2),
                    "detect_seconds": round(time.monotonic() - t0, 1),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    args.out.write_text(
        json.dumps(
            {
                "code_version": code_version(),
                "command": "nice -n 10 python bench/detect_calibration_cli.py "
                + " ".join(sys.argv[1:]),
                "detectors": args.detectors.split(","),
                "calibration_seed": args.calibration_seed,
                "eval": {
                    "benign_accounts": args.eval_benign,
                    "campaigns": ["bulk", "slowlow"],
                    "seed": args.eval_seed,
                },
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
