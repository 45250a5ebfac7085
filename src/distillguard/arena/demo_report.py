"""``OUT/report.html`` of ``distillguard demo``: the five acts as a page a person reads.

Every number in its text is read from the report dict that ``demo.json`` is written from (an
element carrying ``data-key="a.b.c"`` shows ``report["a"]["b"]["c"]``; the browser test compares
them). The plots add what the dict summarises, read from the demo's own files in ``OUT``: the
ledger (each request's policy level and canary flag; the detection scores per request, replayed
with the demo's calibration), act 1's ``detection.png`` and the student's ``train_summary.json``.
Self-contained: plots are embedded ``data:`` PNGs, no script, no external URL.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

from distillguard.arena.demo_config import CANARY_DECOYS, DISTILLER
from distillguard.htmlreport import figure_html, figure_png, fmt, page

LEVELS = ("normal", "suspect", "extracting")
e = html.escape


def show(value) -> str:
    """How a value of the report dict is shown (the browser test reads it back)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "nobody"
    return str(value)


def lookup(report: dict, key: str):
    """``report`` at the dotted path ``key`` (list indices as numbers)."""
    node = report
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _v(report: dict, key: str) -> str:
    """A value of the report, marked with where it comes from."""
    return f'<span data-key="{e(key)}">{e(show(lookup(report, key)))}</span>'


def _p(report: dict, key: str) -> str:
    """A log10 p-value of the report as 'p = 10^x' (the number shown is the exponent)."""
    return f"p = 10<sup>{_v(report, key)}</sup>"


# ---- what the ledger says, request by request -----------------------------------------------


def _ledger_rows(out: Path) -> list:
    from sqlalchemy import select

    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(f"sqlite:///{out / 'ledger.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(
                select(
                    LedgerRow.account_id, LedgerRow.policy_action, LedgerRow.request_id
                ).order_by(LedgerRow.ts, LedgerRow.id)
            ).all()
    finally:
        engine.dispose()


def _replayed_scores(out: Path) -> dict[str, list[float]]:
    """Each account's detection score after each of its requests: the ledger replayed through
    the detectors with the calibration the gateway was started with (the gateway keeps no score
    per request, only its verdicts)."""
    from distillguard.detect import AccountMonitor, Calibration
    from distillguard.detect.embed import shared_embedder
    from distillguard.guard.db import make_engine
    from distillguard.guard.ledger import iter_traffic

    engine = make_engine(f"sqlite:///{out / 'ledger.db'}")
    try:
        records = list(iter_traffic(engine))
    finally:
        engine.dispose()
    monitor = AccountMonitor(Calibration.load(out / "calibration.npz"), embedder=shared_embedder())
    scores: dict[str, list[float]] = defaultdict(list)
    for v in monitor.observe_batch(records):
        scores[v.account].append(v.score)
    return scores


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _request_numbers(rows: list) -> dict[str, int]:
    """request_id -> its 1-based number within its account (the x axis of the plots)."""
    seen: dict[str, int] = defaultdict(int)
    numbers = {}
    for r in rows:
        seen[r.account_id] += 1
        numbers[r.request_id] = seen[r.account_id]
    return numbers


def _timeline_plot(report: dict, scores: dict[str, list[float]], rows: list) -> str:
    plt = _plt()
    threshold = report["detection"]["calibration"]["threshold"]
    d = report["live"]["ledger"][DISTILLER]
    numbers = _request_numbers(rows)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, ys in sorted(scores.items(), key=lambda kv: kv[0] == DISTILLER):
        distiller = name == DISTILLER
        ax.plot(
            range(1, len(ys) + 1),
            ys,
            marker="" if distiller else "o",
            ms=3,
            lw=1.5 if distiller else 1,
            color="tab:red" if distiller else "tab:green",
            alpha=1 if distiller else 0.6,
            label=name if distiller else None,
        )
    ax.plot([], [], color="tab:green", marker="o", ms=3, label="benign users")
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:.1f}")
    colours = {"watch": "tab:olive", "suspect": "tab:orange", "extracting": "tab:purple"}
    for v in report["live"]["verdicts"].get("data", []):
        at = numbers.get(v.get("request_id"))
        if at is not None and v.get("score") is not None and v["level"] in colours:
            ax.plot(at, v["score"], "o", mfc="none", ms=8, color=colours[v["level"]],
                    label=f"{v['account_id']}: verdict {v['level']} at request {at}")  # fmt: skip
    for what in ("suspect", "extracting"):
        at = d[f"{what}_from_request"]
        if at:
            ax.axvline(
                at, color=colours[what], lw=1, ls=":", label=f"{what} policy from request {at}"
            )
    ax.set(xlabel="the account's request number", ylabel="detection score")
    ax.set_title("live gateway: each account's score after each request")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def _policy_plot(rows: list, accounts: list[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.35 * len(accounts)))
    for i, name in enumerate(accounts):
        actions = [r.policy_action or "" for r in rows if r.account_id == name]
        level = [
            2 if a.startswith("extracting") else 1 if a.startswith("suspect") else 0
            for a in actions
        ]
        xs = range(1, len(actions) + 1)
        colours = ["#2e7d32", "#ef6c00", "#6a1b9a"]
        ax.scatter(xs, [i] * len(xs), c=[colours[k] for k in level], s=14, marker="s")
        canary = [x for x, a in zip(xs, actions) if "canary" in a]
        ax.scatter(canary, [i + 0.3] * len(canary), marker="v", color="black", s=16)
    for k, colour in enumerate(["#2e7d32", "#ef6c00", "#6a1b9a"]):
        ax.scatter([], [], c=colour, marker="s", s=14, label=LEVELS[k])
    ax.scatter([], [], marker="v", color="black", s=16, label="canary served")
    ax.set_yticks(range(len(accounts)), accounts)
    ax.set_ylim(-0.6, len(accounts) - 0.2)
    ax.invert_yaxis()
    ax.set_xlabel("the account's request number")
    ax.set_title("what the policy did to each request (from the ledger)")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def _trace_rows(report: dict) -> list[tuple[str, str]]:
    """(label, key of its entry in report['trace'])."""
    tr = report["trace"]
    rows = [
        ("the distiller's dataset", "trace.distiller_data"),
        ("every answer the distiller received", "trace.distiller_received"),
    ]
    rows += [(f"{u}'s answers", f"trace.users.{u}") for u in tr["users"]]
    rows.append(("ShareGPT answers by another model (control)", "trace.other_model"))
    return rows


def _trace_plot(report: dict) -> str:
    plt = _plt()
    rows = _trace_rows(report)
    accounts = list(report["live"]["ledger"])
    values = [[-lookup(report, k)["log10_p"][a] for a in accounts] for _, k in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(accounts), 0.9 + 0.42 * len(rows)))
    im = ax.imshow([[min(v, 20) for v in r] for r in values], cmap="Reds", vmin=0, vmax=20)
    for i, r in enumerate(values):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="center", size=7)
    ax.set_xticks(range(len(accounts)), accounts, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_title("-log10 p of each account's watermark key (capped at 20 for colour)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return figure_png(fig)


def _canary_plot(student: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.4))
    labels, ranks = [], []
    for model in ("student", "untrained_student"):
        for a in student[model]["accounts"]:
            labels.append(f"{model.replace('_', ' ')} / {a['account']}")
            ranks.append(a["mean_rank"])
    ax.barh(labels, ranks, color=["#c0392b" if "untrained" not in x else "#7f8c8d" for x in labels])
    null = (CANARY_DECOYS + 2) / 2  # the mean rank of a model that never saw the canaries
    ax.axvline(
        null, color="grey", ls="--", lw=1, label=f"no memory: {null:g} of {CANARY_DECOYS + 1}"
    )
    ax.invert_yaxis()
    ax.set_xlabel("mean rank of the canaries' true endings (1 = always first)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _loss_plot(report: dict, history: list[dict]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot([h.get("step") for h in history], [h["loss"] for h in history], marker="o", ms=3)
    ax.set(xlabel="training step", ylabel="training loss")
    ax.set_title(
        f"student trained on {report['student']['curated_rows']} answers bought with "
        f"{report['live']['ledger'][DISTILLER]['requests']} teacher requests",
        fontsize=9,
    )
    fig.tight_layout()
    return figure_png(fig)


TEST_TITLES = {
    "identity": "identity probes",
    "similarity": "behavioural similarity",
    "radioactivity": "watermark radioactivity",
    "canaries": "canaries (weights)",
}


def _forensics_html(report: dict, out: Path) -> str:
    """Act 4's forensics report: its verdict, each test, the API-only canary test."""
    f = report.get("forensics")
    if f is None:
        return ""
    if "skipped" in f:
        return f"<p>Forensics report: skipped, {_v(report, 'forensics.skipped')}.</p>"
    link = (
        '<a href="forensics/report.html">forensics/report.html</a>'
        if (out / "forensics" / "report.html").is_file()
        else "<code>forensics/report.html</code> (not in this folder)"
    )
    parts = [
        "<h3>The forensics report</h3>"
        "<p>The student judged by <code>distillguard forensics report</code>'s own code, with the "
        f"untrained student (<code>{_v(report, 'forensics.control.spec')}</code>) as its control "
        "and the demo's ledger and secret. Each test's p-value is Holm-adjusted over the tests "
        "that ran; the verdict says <em>distilled</em> only where a test is significant and the "
        "student's statistic is above the control's. Verdict: "
        f"<strong>{_v(report, 'forensics.verdict')}</strong> (combined p "
        f"{_v(report, 'forensics.combined_p')}, alpha {_v(report, 'forensics.alpha')}), "
        f"traced to <strong>{_v(report, 'forensics.traced')}</strong>. The whole report, with "
        f"its plots, input hashes and commands: {link}.</p>"
        "<table><tr><th>test</th><th>ran</th><th>statistic</th><th>the control's</th>"
        "<th>p</th><th>p (Holm)</th><th>traced to</th><th>why not</th></tr>"
    ]
    for name, t in f["tests"].items():
        k = f"forensics.tests.{name}"
        traced = _v(report, k + ".traced") if t["traced"] is not None else "–"
        parts.append(
            f"<tr><td>{e(TEST_TITLES.get(name, name))}</td><td>{_v(report, k + '.ran')}</td>"
            f"<td>{_v(report, k + '.statistic')}</td><td>{_v(report, k + '.control')}</td>"
            f"<td>{_v(report, k + '.p_value')}</td><td>{_v(report, k + '.p_holm')}</td>"
            f"<td>{traced}</td><td>{e(t['why_not'] or '')}</td></tr>"
        )
    parts.append("</table>")
    parts.append(
        "<p>The control under the same exact tests (radioactivity, canaries in the weights and "
        f"through its API), Holm over them: p {_v(report, 'forensics.control.combined_p')}, "
        f"traced to {_v(report, 'forensics.control.traced')}.</p>"
    )
    api = f["api_canaries"]
    if not api["ran"]:
        parts.append(
            f"<p>The API-only canary test could not run: {_v(report, 'forensics.api_canaries.why_not')}.</p>"
        )
        return "".join(parts)
    parts.append(
        "<h3>Canaries through the API only</h3><p>The student and the control, each served by "
        "<code>distillguard serve --model SPEC --no-guard</code> on a loopback port and asked "
        "only through its OpenAI-compatible endpoint: each canary's ending and its "
        f"{CANARY_DECOYS} decoys are scored by the logprobs the endpoint's "
        "<code>/v1/completions</code> echo gives them (exact rank p-values, Fisher per account, "
        "Holm). The same report, canaries only: "
        '<a href="forensics/api/report.html">forensics/api/report.html</a>.</p>'
        "<table><tr><th>model</th><th>scoring</th><th>account</th><th>canaries</th>"
        "<th>ranked first</th><th>mean rank</th><th>p (Holm)</th><th>traced to</th></tr>"
    )
    for model in ("student", "untrained_student"):
        for i, _ in enumerate(api[model]["accounts"]):
            k = f"forensics.api_canaries.{model}"
            a = f"{k}.accounts.{i}"
            parts.append(
                f"<tr><td>{e(model.replace('_', ' '))}</td><td>{_v(report, k + '.scoring')}</td>"
                f"<td>{_v(report, a + '.account')}</td><td>{_v(report, a + '.canaries')}</td>"
                f"<td>{_v(report, a + '.top1')}</td><td>{_v(report, a + '.mean_rank')}</td>"
                f"<td>{_v(report, a + '.p_holm')}</td><td>{_v(report, k + '.traced')}</td></tr>"
            )
    parts.append("</table>")
    return "".join(parts)


# ---- the page -------------------------------------------------------------------------------


def _quality_html(report: dict) -> str:
    """Act 5: the student and its control against the teacher on held-out prompts."""
    q = report.get("quality")
    if q is None:
        return "<p>Its quality on held-out prompts was not measured (<code>--quality-prompts 0</code>).</p>"
    if "skipped" in q:
        return f"<p>Its quality on held-out prompts: skipped, {_v(report, 'quality.skipped')}.</p>"
    rows = [
        ("the teacher (the floor)", "quality.teacher", False),
        ("the student", "quality.student", True),
        ("the untrained student (control)", "quality.untrained_student", True),
    ]
    out = [
        f"<p>On {_v(report, 'quality.prompts')} held-out ShareGPT prompts that no account sent "
        "the gateway, each model is scored against the teacher's greedy answers (up to "
        f"{_v(report, 'quality.max_new_tokens')} tokens) as <code>distillguard distill eval</code> "
        "scores a student: the NLL of the teacher's answers (nats per token; lower is closer to "
        "the teacher), ROUGE-L of its own greedy answers against the teacher's, and the share of "
        "repeated 4-grams in its own answers (a looping model can score a low NLL).</p>"
        "<table><tr><th>model</th><th>parameters</th><th>NLL of the teacher's answers</th>"
        "<th>ROUGE-L vs the teacher</th><th>repeated 4-grams</th></tr>"
    ]
    for label, k, student in rows:
        rouge = _v(report, k + ".rouge_l") if student else "–"
        out.append(
            f"<tr><td>{e(label)}</td><td>{_v(report, k + '.parameters')}</td>"
            f"<td>{_v(report, k + '.nll')}</td><td>{rouge}</td>"
            f"<td>{_v(report, k + '.rep4')}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def render_html(report: dict, out: Path) -> str:
    """The page for ``report`` (the dict demo.json is written from) and the files in ``out``."""
    det, live = report["detection"], report["live"]
    users = [a for a in live["ledger"] if a != DISTILLER]
    parts = [
        "<h1>distillguard demo</h1>",
        f"<p>Teacher <code>{_v(report, 'live.model')}</code>, results in "
        f"<code>{e(str(out))}</code>, {report['seconds']:.0f} s of work. The same numbers are in "
        "<code>demo.json</code>; every part is real (a gateway subprocess, HTTP clients, a "
        "SQLite ledger) and the truth is known: who extracted and who did not.</p>",
        "<h2>In short</h2><ul>",
        f"<li>Detection, calibrated on {_v(report, 'detection.calibration.accounts')} benign "
        f"users: {_v(report, 'detection.benign.flagged')} of "
        f"{_v(report, 'detection.benign.accounts')} held-out benign users flagged; campaigns "
        "caught: "
        + ", ".join(
            f"{e(k)} {_v(report, f'detection.campaigns.{k}.flagged')}/"
            f"{_v(report, f'detection.campaigns.{k}.accounts')}"
            for k in det["campaigns"]
        )
        + ".</li>",
        f"<li>Live: the distiller was <em>suspect</em> from its request "
        f"{_v(report, f'live.ledger.{DISTILLER}.suspect_from_request')}, <em>extracting</em> "
        f"from {_v(report, f'live.ledger.{DISTILLER}.extracting_from_request')} of "
        f"{_v(report, f'live.ledger.{DISTILLER}.requests')}, and was served "
        f"{_v(report, f'live.ledger.{DISTILLER}.canary_requests')} canaries; benign users "
        "touched by the policy: "
        + (
            ", ".join(
                u
                for u in users
                if live["ledger"][u]["suspect_requests"] or live["ledger"][u]["canary_requests"]
            )
            or "none"
        )
        + f" (of {len(users)}).</li>",
        f"<li>Tracing: the distiller's dataset traces to "
        f"<strong>{_v(report, 'trace.distiller_data.traced')}</strong> "
        f"({_p(report, f'trace.distiller_data.log10_p.{DISTILLER}')} for its key); "
        f"another model's answers (control) to {_v(report, 'trace.other_model.traced')}.</li>",
    ]
    st = report.get("student")
    if st is not None and "skipped" not in st:
        parts.append(
            f"<li>The student trained on the distiller's data: canaries traced to "
            f"<strong>{_v(report, 'student.student.traced')}</strong>; the untrained student "
            f"(control): {_v(report, 'student.untrained_student.traced')}.</li>"
        )
    elif st is not None:
        parts.append(f"<li>Student: skipped, {_v(report, 'student.skipped')}.</li>")
    fr = report.get("forensics")
    if fr is not None and "skipped" not in fr:
        parts.append(
            f"<li>The forensics report on the student: <strong>{_v(report, 'forensics.verdict')}"
            f"</strong> (combined p {_v(report, 'forensics.combined_p')}), traced to "
            f"{_v(report, 'forensics.traced')}; by its API alone, canaries traced to "
            f"{_v(report, 'forensics.api_canaries.student.traced')} (untrained student: "
            f"{_v(report, 'forensics.api_canaries.untrained_student.traced')}).</li>"
            if fr["api_canaries"]["ran"]
            else f"<li>The forensics report on the student: <strong>"
            f"{_v(report, 'forensics.verdict')}</strong> (combined p "
            f"{_v(report, 'forensics.combined_p')}), traced to {_v(report, 'forensics.traced')}.</li>"
        )
    q = report.get("quality")
    if q is not None and "skipped" not in q:
        parts.append(
            f"<li>What {_v(report, f'live.ledger.{DISTILLER}.requests')} teacher queries bought: "
            f"on {_v(report, 'quality.prompts')} held-out prompts the student's NLL of the "
            f"teacher's answers is {_v(report, 'quality.student.nll')} nats/token (untrained "
            f"student {_v(report, 'quality.untrained_student.nll')}, the teacher itself "
            f"{_v(report, 'quality.teacher.nll')}), ROUGE-L against the teacher "
            f"{_v(report, 'quality.student.rouge_l')} (untrained "
            f"{_v(report, 'quality.untrained_student.rouge_l')}).</li>"
        )
    parts.append("</ul>")

    # 1. detection
    parts.append(
        "<h2>1. Detection on labelled arena traffic</h2>"
        f"<p>Threshold {_v(report, 'detection.calibration.threshold')} for a false-positive "
        f"rate of {_v(report, 'detection.calibration.target_fpr')} per benign account-day.</p>"
        "<table><tr><th>traffic</th><th>accounts</th><th>flagged</th>"
        "<th>median requests to flag</th><th>why (first account)</th></tr>"
        f"<tr><td>held-out benign users</td><td>{_v(report, 'detection.benign.accounts')}</td>"
        f"<td>{_v(report, 'detection.benign.flagged')}</td><td>–</td><td></td></tr>"
    )
    for k, c in det["campaigns"].items():
        parts.append(
            f"<tr><td>campaign {e(k)}</td>"
            f"<td>{_v(report, f'detection.campaigns.{k}.accounts')}</td>"
            f"<td>{_v(report, f'detection.campaigns.{k}.flagged')}</td>"
            f"<td>{_v(report, f'detection.campaigns.{k}.median_requests_to_flag')}</td>"
            f"<td>{'<br>'.join(e(r) for r in c['reasons'])}</td></tr>"
        )
    parts.append("</table>")
    png = out / "detection.png"
    if png.is_file():
        parts.append(
            figure_html(
                base64.b64encode(png.read_bytes()).decode(),
                "account scores by traffic kind",
                "each account's highest score: held-out benign users vs each campaign",
            )
        )

    # 2. live
    rows = _ledger_rows(out) if (out / "ledger.db").is_file() else []
    parts.append("<h2>2. Live: the gateway, a distiller and benign users</h2>")
    if (out / "calibration.npz").is_file() and rows:
        parts.append(
            figure_html(
                _timeline_plot(report, _replayed_scores(out), rows),
                "detection score per request",
                "scores replayed from the ledger with the gateway's calibration; circles: the "
                "online monitor's verdicts, at the request that triggered each; dotted lines: the "
                "first request the policy level applied to (later, as the monitor runs beside the "
                "gateway and the distiller keeps requests in flight)",
            )
        )
    if rows:
        parts.append(
            figure_html(_policy_plot(rows, list(live["ledger"])), "policy level per request")
        )
    parts.append(
        "<table><tr><th>account</th><th>requests</th><th>statuses</th><th>suspect from</th>"
        "<th>extracting from</th><th>canaries served</th></tr>"
    )
    for name, s in live["ledger"].items():
        k = f"live.ledger.{name}"
        parts.append(
            f"<tr><td>{e(name)}</td><td>{_v(report, k + '.requests')}</td>"
            f"<td>{e(', '.join(f'{a}: {n}' for a, n in sorted(s['statuses'].items())))}</td>"
            f"<td>{_v(report, k + '.suspect_from_request')}</td>"
            f"<td>{_v(report, k + '.extracting_from_request')}</td>"
            f"<td>{_v(report, k + '.canary_requests')}</td></tr>"
        )
    parts.append("</table>")
    verdicts = live.get("verdicts", {}).get("data", [])
    if verdicts:
        parts.append("<p>The online monitor's verdicts (newest first):</p><ul>")
        for v in verdicts:
            parts.append(
                f"<li><strong>{e(str(v['account_id']))}: {e(str(v['level']))}</strong> "
                f"(score {e(fmt(v.get('score')))}): {e('; '.join(v.get('reasons') or []))}</li>"
            )
        parts.append("</ul>")
    h = live["harvest"]
    parts.append(
        f"<p>The distiller stored {_v(report, 'live.harvest.stored_ok')} finished answers "
        f"({_v(report, 'live.harvest.data_rows')} usable rows), "
        f"{_v(report, 'live.harvest.completion_tokens')} completion tokens in "
        f"{e(fmt(h['seconds']))} s.</p>"
    )

    # 3. tracing
    parts.append(
        "<h2>3. Whose watermark is in the text</h2><p>Exact p-values of each account's key, Holm "
        "over accounts; the users' own answers and another model's text are the controls.</p>"
        "<table><tr><th>text</th><th>texts</th><th>traced to</th>"
        "<th>log10 p of the distiller's key</th></tr>"
    )
    for label, k in _trace_rows(report):
        parts.append(
            f"<tr><td>{e(label)}</td><td>{_v(report, k + '.texts')}</td>"
            f"<td>{_v(report, k + '.traced')}</td>"
            f"<td>{_v(report, f'{k}.log10_p.{DISTILLER}')}</td></tr>"
        )
    parts.append("</table>")
    parts.append(figure_html(_trace_plot(report), "watermark p-values per text and key"))

    # 4. the student
    parts.append("<h2>4. The suspect model</h2>")
    if st is None:
        parts.append("<p>Not run (<code>--student none</code>).</p>")
    elif "skipped" in st:
        parts.append(f"<p>Skipped: {_v(report, 'student.skipped')}.</p>")
    else:
        parts.append(
            "<p>Canaries served to the distiller, each ranked against "
            f"{CANARY_DECOYS} decoy endings by each model's likelihood (exact rank p-values, Fisher per account, Holm over accounts).</p>"
            "<table><tr><th>model</th><th>account</th><th>canaries</th><th>ranked first</th>"
            f"<th>mean rank (of {CANARY_DECOYS + 1})</th><th>p (Holm)</th><th>traced</th><th>power</th></tr>"
        )
        from distillguard.watermark.power import Power

        for model in ("student", "untrained_student"):
            for i, a in enumerate(st[model]["accounts"]):
                k = f"student.{model}.accounts.{i}"
                traced = a["account"] in st[model]["traced"]
                # a "not traced" says what the test could have seen at this size
                power = (
                    "" if traced or not a.get("power") else Power.from_dict(a["power"]).summary()
                )
                parts.append(
                    f"<tr><td>{e(model.replace('_', ' '))}</td><td>{e(a['account'])}</td>"
                    f"<td>{_v(report, k + '.canaries')}</td><td>{_v(report, k + '.top1')}</td>"
                    f"<td>{_v(report, k + '.mean_rank')}</td>"
                    f"<td>{_v(report, k + '.p_holm')}</td>"
                    f"<td>{'yes' if traced else 'no'}</td>"
                    f"<td>{e(power)}</td></tr>"
                )
        parts.append("</table>")
        parts.append(figure_html(_canary_plot(st), "canary ranks"))
        parts.append(_forensics_html(report, out))

        # 5. cost vs quality
        parts.append(
            "<h2>5. What the student cost, and what it learned</h2>"
            f"<p>{_v(report, f'live.ledger.{DISTILLER}.requests')} teacher requests, "
            f"{_v(report, 'live.harvest.completion_tokens')} completion tokens, "
            f"{_v(report, 'student.curated_rows')} training rows, "
            f"{_v(report, 'student.train.steps')} steps, final training loss "
            f"{_v(report, 'student.train.final_loss')}. The demo's student is a canary carrier "
            "(plain SFT on a few rows), not a good student.</p>"
        )
        parts.append(_quality_html(report))
        summary = out / "student" / "train_summary.json"
        history = json.loads(summary.read_text()).get("history") if summary.is_file() else None
        if history:
            parts.append(figure_html(_loss_plot(report, history), "training loss"))

    parts.append("<h2>Settings</h2><pre>" + e(json.dumps(report["config"], indent=2)) + "</pre>")
    return page("distillguard demo", "\n".join(parts))


def write_report(report: dict, out: Path) -> Path:
    """Write ``out/report.html``; returns its path."""
    path = out / "report.html"
    path.write_text(render_html(report, out))
    return path


__all__ = ["lookup", "render_html", "show", "write_report"]
