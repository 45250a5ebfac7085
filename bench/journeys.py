"""Time the actors' walkthroughs (docs/provider.md, distiller.md, investigator.md) at the sizes
the pages document, on the embedded teacher: the same page text that tests/docs/test_journeys.py
runs on the tiny model, run here with none of the pages' variables changed (only PORT, so a
gateway of your own on :8000 is left alone), and each block's wall time written to
bench/results/journeys.json with the load average around the run (the machine may be shared),
and the distiller's 600-prompt harvest as the gateway saw it (its report, the ledger's statuses).

    nice -n 10 python bench/journeys.py                       # all three pages, real sizes
    python bench/journeys.py --set N_PROMPTS=60 --out /tmp/j.json   # a smaller try

A block that fails stops the run; the file then records the pages up to it, the failing block's
output and ``"ok": false``. After a fix, the later pages can be run again in that run's directory
(its ledger, calibration, harvest and student; the gateway restarted as the provider page's step
6 starts it, not timed), keeping the earlier file's figures for the pages not rerun and its
failure under ``earlier_attempt``:

    python bench/journeys.py --resume /tmp/journeys-XXXX --pages investigator \
        --merge bench/results/journeys.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the runner is the walkthrough test's, so the bench runs the pages exactly as CI does
sys.path.insert(0, str(ROOT))
from tests.docs.test_journeys import (  # noqa: E402
    DOCS,
    PAGES,
    BashSession,
    Block,
    failure_message,
    journey_env,
    page_blocks,
    port_free,
    run_page,
)

STEP = re.compile(r"\*\*(\d+\.\s*[^*]+?)\*\*")


def step_titles(page: Path) -> dict[int, str]:
    """Each block's line -> the bold step title above it (``2. Serve``)."""
    text = page.read_text().splitlines()
    titles, current = {}, ""
    blocks = {b.line for b in page_blocks(page)}
    for number, line in enumerate(text, start=1):
        found = STEP.findall(line)
        if found:
            current = found[-1].rstrip(".: ")
        if number in blocks:
            titles[number] = current
    return titles


def harvest_figures(work: Path) -> dict | None:
    """The distiller page's harvest as the gateway saw it: its report (sent, retries, capped,
    seconds) and the HTTP statuses in the provider page's ledger per account (499: a client that
    gave up), so the run also shows whether 600 prompts at --concurrency 16 finished cleanly."""
    report_path = work / "runs" / "h1" / "report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    out = {
        "report": report,
        "completion_tokens_per_s": report.get("completion_tokens", 0)
        / max(report.get("seconds") or 0, 1e-9),
    }
    ledger = work / "ledger.db"
    if ledger.is_file():
        from sqlalchemy import select

        from distillguard.guard.db import make_engine
        from distillguard.guard.schema import LedgerRow

        engine = make_engine(f"sqlite:///{ledger}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(LedgerRow.account_id, LedgerRow.status)).all()
        finally:
            engine.dispose()
        statuses: dict[str, dict[str, int]] = {}
        for account, status in rows:
            per = statuses.setdefault(str(account), {})
            per[str(status)] = per.get(str(status), 0) + 1
        out["ledger_statuses"] = statuses
        out["client_gave_up_499"] = sum(per.get("499", 0) for per in statuses.values())
    return out


def restart_gateway(base: Path, env: dict[str, str], timeout_s: float) -> BashSession:
    """The provider page's gateway as its step 6 leaves it (settings, then that block less its
    kill of the earlier gateway), for pages run again in an earlier run's directory."""
    page = DOCS / "provider.md"
    blocks = page_blocks(page)
    serve = next(b for b in blocks if "--detect cal.npz" in b.source)
    source = "".join(
        line
        for line in serve.source.splitlines(keepends=True)
        if not line.lstrip().startswith(("kill ", "while kill "))
    )
    session = BashSession(base / "work", env, base / "sessions" / "resume")
    for block in (blocks[0], Block(source=source, line=serve.line)):
        step = session.run(block, timeout_s)
        if not step.ok:
            session.kill()
            sys.exit(failure_message(page, step))
    session.close()  # the gateway keeps running in the session's process group, killed at the end
    return session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18438, help="PORT the pages serve on")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="change one of the pages' documented variables (default: none, the real sizes)",
    )
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated, in order")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "journeys.json"))
    parser.add_argument("--block-timeout", type=float, default=4 * 3600)
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="run the --pages in this earlier run's directory (its home/ and work/)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier run's file: its pages not rerun are kept, its failure recorded",
    )
    args = parser.parse_args()

    if not port_free(args.port):
        sys.exit(f"port {args.port} is taken: give --port")
    variables = {"PORT": str(args.port)}
    for item in args.set:
        name, _, value = item.partition("=")
        variables[name] = value
    pages = [p.strip() for p in args.pages.split(",") if p.strip()]

    if args.resume is not None:
        base = args.resume
        if not (base / "work").is_dir() or not (base / "home").is_dir():
            sys.exit(f"{base} is not a journeys run directory (no home/ and work/)")
    else:
        base = Path(tempfile.mkdtemp(prefix="journeys-"))
        (base / "home").mkdir()
        (base / "work").mkdir()
    env = journey_env(base / "home", variables)
    result = {
        "bench": "journeys",
        "command": "python bench/journeys.py " + " ".join(sys.argv[1:]),
        "variables_changed": variables,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pages": {},
        "ok": True,
    }
    sessions = []
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        result["pages"] = {k: v for k, v in earlier["pages"].items() if k not in pages}
        result["earlier_attempt"] = {
            k: earlier.get(k) for k in ("command", "started", "ok", "failure", "pages")
        }
        if "distiller_harvest" in earlier:
            result["distiller_harvest"] = earlier["distiller_harvest"]
    try:
        if args.resume is not None and "provider" not in pages:
            sessions.append(restart_gateway(base, env, args.block_timeout))
        for name in pages:
            page = DOCS / f"{name}.md"
            titles = step_titles(page)
            t0 = time.perf_counter()
            # a resumed page gets its own scratch: the earlier attempt's log and markers stay
            scratch = base / "sessions" / (f"{name}-resumed" if args.resume else name)
            steps, session = run_page(
                page, base / "work", env, scratch, timeout_s=args.block_timeout
            )
            sessions.append(session)
            result["pages"][name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "steps": [
                    {
                        "step": titles.get(s.block.line, ""),
                        "line": s.block.line,
                        "seconds": round(s.seconds, 1),
                        "ok": s.ok,
                    }
                    for s in steps
                ],
            }
            print(f"{name}: {result['pages'][name]['seconds']} s", file=sys.stderr)
            if not steps[-1].ok:
                result["ok"] = False
                result["failure"] = failure_message(page, steps[-1])[-4000:]
                print(result["failure"], file=sys.stderr)
                break
    finally:
        for session in sessions:
            session.kill()
        harvest = harvest_figures(base / "work") if "distiller" in pages else None
        if harvest:
            result["distiller_harvest"] = harvest
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out} (work directory {base})", file=sys.stderr)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
