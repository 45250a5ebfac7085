"""Issue 28's must-be-true: a harvest of the first 600 ShareGPT prompts at ``--concurrency 16`` on
the embedded teacher finishes in one run, without a 499 and without a restart.

As a user runs it: ``distillguard serve`` (guard on: keys, ledger, watermark) on the embedded
teacher, in a temporary data directory (its own ledger and watermark secret), one account's key
from the admin API, then the ``distillguard distill harvest`` CLI with its defaults
(``--max-tokens``, ``--max-prompt-tokens``) except the prompts, ``--limit 600`` and
``--concurrency 16``. Writes ``bench/results/harvest_sharegpt600.json``: the CLI's exit status,
wall time, answers/s, completion tokens/s, its report (sent, failed, retries, prompts over the
cap, capped answers), the HTTP statuses in the gateway's ledger (499: a client that gave up), and
the machine's load average at start and end (other work shares its cores).

    nice -n 10 python bench/harvest_sharegpt600.py      # ~30-60 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.serve.process import distillguard_command, serve_subprocess

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--model", default="smollm2", help="the teacher (tiny: a smoke test)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="the harvest's, seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results/harvest_sharegpt600.json")
    args = parser.parse_args()
    admin = "admin-" + uuid.uuid4().hex
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_DATA_HOME": tmp, "DISTILLGUARD_ADMIN_KEY": admin}
        db = f"sqlite:///{tmp}/ledger.db"
        with serve_subprocess("--model", args.model, "--db", db, env=env, timeout_s=900) as server:
            r = httpx.post(
                f"{server.url}/admin/keys",
                json={"account": "acme-labs"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            r.raise_for_status()
            cmd = distillguard_command(
                "distill", "harvest", "--teacher", server.url + "/v1", "--prompts", "sharegpt",
                "--limit", str(args.limit), "--concurrency", str(args.concurrency),
                "--out", f"{tmp}/h", "--model", args.model,
            )  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(
                cmd,
                env={**env, "DISTILLGUARD_TEACHER_API_KEY": r.json()["key"], "COLUMNS": "200"},
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            wall = time.perf_counter() - t0
            load_end = os.getloadavg()
        report_path = Path(tmp) / "h" / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        engine = make_engine(db)
        with engine.connect() as conn:
            statuses = collections.Counter(
                str(s) for (s,) in conn.execute(select(LedgerRow.status)).all()
            )
        engine.dispose()
    answers = (report or {}).get("answers_ok", 0) + (report or {}).get("answers_capped", 0)
    completion = (report or {}).get("completion_tokens", 0)
    result = {
        "what": "distill harvest of the first ShareGPT prompts on the teacher behind the guarded "
        "gateway, CLI defaults but --limit and --concurrency",
        "teacher": args.model,
        "command": "python bench/harvest_sharegpt600.py " + " ".join(sys.argv[1:]),
        "harvest_command": " ".join(["distillguard", *cmd[cmd.index("distill") :]]),
        "exit_status": done.returncode,
        "finished_in_one_run": done.returncode == 0,
        "wall_s": wall,
        "answers": answers,
        "answers_per_s": answers / wall,
        "completion_tokens_per_s": completion / wall,
        "ledger_statuses": dict(statuses),
        "client_gave_up_499": statuses.get("499", 0),
        "report": report,
        "summary_lines": done.stderr.splitlines()[-8:],
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
