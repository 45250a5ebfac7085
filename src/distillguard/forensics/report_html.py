"""``report.html`` of a forensics report: the evidence dict as a self-contained page (no script,
no external URL, plots as data: PNGs)."""

from __future__ import annotations

import html
import json
import textwrap

from distillguard.htmlreport import figure_png
from distillguard.htmlreport import fmt as _fmt


def _plot(test: dict) -> str:
    """A bar per model (the suspect in red), as an embedded PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a control's label may hold a long path (the cached default control): the table has it whole
    labels = ["suspect", *(k if len(k) <= 48 else f"{k[:34]}…{k[-12:]}" for k in test["controls"])]
    values = [test["statistic"], *test["controls"].values()]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(labels)))
    ax.barh(labels, values, color=["#c0392b"] + ["#7f8c8d"] * (len(labels) - 1))
    ax.invert_yaxis()
    ax.set_xlabel(textwrap.fill(test["statistic_name"], 60))
    ax.set_title(f"{test['name']}: p = {_fmt(test['p_value'])}")
    fig.tight_layout()
    return figure_png(fig)


def render_html(evidence: dict) -> str:
    """A self-contained page: no script, no external URL, plots as data: PNGs."""
    e = html.escape
    rows, plots = [], []
    for t in evidence["tests"]:
        name = t["name"]
        status = "ran" if t["could_run"] else f"could not run: {t['why_not']}"
        controls = ", ".join(f"{e(k)}: {_fmt(v)}" for k, v in t["controls"].items()) or "–"
        rows.append(
            f"<tr><td>{e(name)}</td><td>{e(t['statistic_name'] or '–')}</td>"
            f'<td data-key="{e(name)}.statistic">{_fmt(t["statistic"])}</td>'
            f"<td>{controls}</td>"
            f'<td data-key="{e(name)}.p_value">{_fmt(t["p_value"])}</td>'
            f'<td data-key="{e(name)}.p_holm">{_fmt(t["p_holm"])}</td>'
            f"<td>{'yes' if t['within_controls_range'] else 'no'}</td>"
            f"<td>{e(status)}</td></tr>"
        )
        if t["could_run"] and t["statistic"] is not None:
            plots.append(
                f'<figure><img alt="{e(name)}" src="data:image/png;base64,{_plot(t)}">'
                f"<figcaption>{e(name)}: reproduce with <code>{e(t['command'])}</code>"
                "</figcaption></figure>"
            )
    inputs = evidence["inputs"]
    models = inputs["models"]
    hashes = [("suspect", models["suspect"])]
    if "teacher" in models:
        hashes.append(("teacher", models["teacher"]))
    hashes += list(models["controls"].items())
    hash_rows = "".join(
        f"<tr><td>{e(label)}</td><td>{e(m['spec'])}</td>"
        f"<td><code>{e(m.get('weights_sha256') or m.get('url', '–'))}</code></td>"
        f"<td><code>{e(m.get('files_sha256', '–'))}</code></td></tr>"
        for label, m in hashes
    )
    other = {k: v for k, v in inputs.items() if k != "models"}
    combined = evidence["combined_p"]
    defaults = evidence.get("default_controls", {})
    if defaults.get("used"):
        shown = [c for c in evidence["controls"] if c["default"]]
        control_note = "Default controls, built from the suspect's training record: " + "; ".join(
            f"<code>{e(c['spec'])}</code> ({e(c['kind'])})" for c in shown
        )
    else:
        control_note = f"No default controls: {e(defaults.get('why_not', '–'))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Forensics report: {e(evidence["config"]["suspect"])}</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }}
.verdict {{ font-size: 1.6em; padding: .4em .8em; display: inline-block;
  background: {"#fdecea" if evidence["verdict"] == "distilled" else "#eef5ee"}; }}
code {{ font-size: .85em; word-break: break-all; }}
figure {{ display: inline-block; margin: 1em; }}
</style></head><body>
<h1>Forensics report</h1>
<p>Suspect <code>{e(evidence["config"]["suspect"])}</code>, teacher
<code>{e(str(evidence["config"]["teacher"]))}</code>, {len(models["controls"])} control(s);
created {e(evidence["created"])}.</p>
<p data-key="default_controls">{control_note}.</p>
<p class="verdict">Verdict: <strong data-key="verdict">{e(evidence["verdict"])}</strong>;
combined p (Holm) = <span data-key="combined_p">{_fmt(combined)}</span>
at &alpha; = <span data-key="alpha">{_fmt(evidence["alpha"])}</span></p>
<p>"distilled" needs a test significant after Holm's correction over the tests that ran
<em>and</em> a suspect statistic above every control's.</p>
<h2>Tests</h2>
<table><tr><th>test</th><th>statistic</th><th>suspect</th><th>controls</th><th>p</th>
<th>p (Holm)</th><th>within the controls' range</th><th>status</th></tr>
{"".join(rows)}</table>
{"".join(plots)}
<h2>Inputs (SHA-256)</h2>
<table><tr><th>model</th><th>spec</th><th>weights</th><th>files</th></tr>{hash_rows}</table>
<pre>{e(json.dumps(other, indent=2))}</pre>
<h2>Reproduce</h2>
<p><code>{e(evidence["command"])}</code></p>
<h2>Versions</h2>
<pre>{e(json.dumps(evidence["versions"], indent=2))}</pre>
</body></html>
"""
