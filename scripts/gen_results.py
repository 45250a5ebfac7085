"""Render bench/results/* as the docs site's results pages (docs/results/*.md).

Every number the docs quote lives in a committed file under ``bench/results/``; these pages show
those files as tables, so a page cannot drift from its file. ``tests/docs/test_docs.py``
regenerates them into a temporary folder and fails when the committed pages differ.

    python scripts/gen_results.py                  # rewrite docs/results/
    python scripts/gen_results.py --out /tmp/res   # write elsewhere (what the test does)

The layout of the JSON files is each bench's own, so the rendering is generic: scalars become
key/value tables, lists of records and mappings of records become tables, anything deeper a
section of its own. The only hand-written parts are the one-line descriptions and commands below
(text, never numbers).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "results"

# Benches retired from bench/ (their conclusions are decision records; the scripts stay in git
# history at the commit named there).
RETIRED = {
    "synthid_saturation": "../decisions/synthid-sum-per-index.md",
    "watermark_synthid_layers": "../decisions/synthid-layer-weights.md",
    "student_head_rank": "../decisions/student-factored-head.md",
    "student_factored_head": "../decisions/student-factored-head.md",
    "prune_choice": "../decisions/prune-layer-choice.md",
    "distill_onpolicy": "../decisions/distill-onpolicy.md",
    "distill_decoding": "../decisions/distill-decoding.md",
    "detect_embed_cost": "../decisions/detect-embed-cost.md",
}

# Which area a bench measures (the index's sections) and what it measures, in one line.
BENCHES = {
    "gateway_overhead": (
        "Gateway and serving",
        "latency and req/s added by the gateway, vs a direct stub and LiteLLM",
    ),
    "serve_throughput": (
        "Gateway and serving",
        "continuous batching, 16 clients vs 1: the local backend; vLLM with the watermark plugin",
    ),
    "prefill_fairness": (
        "Gateway and serving",
        "a short request's latency beside a long prefill, chunked or not",
    ),
    "limiter_overhead": ("Gateway and serving", "cost of the in-process and Redis limiters"),
    "gateway_memory": (
        "Gateway and serving",
        "a real server's resident memory over rounds of valid, hostile and 2-MB-prompt requests",
    ),
    "ledger_privacy": ("Guard", "detection with the ledger keeping full text, hashes or nothing"),
    "policy_impact": ("Guard", "what each countermeasure costs a benign user flagged by mistake"),
    "ladder_false_positives": (
        "Guard",
        "benign accounts the default ladder takes to suspect and extracting, and for how long",
    ),
    "antidistill": ("Guard", "antidistillation sampling: benign cost vs student loss"),
    "watermark_quality": (
        "Watermarks",
        "detection rate by answer length and perplexity cost per scheme",
    ),
    "watermark_fpr": ("Watermarks", "false positives on real ChatGPT answers"),
    "watermark_overhead": ("Watermarks", "generation cost of the watermark in the serve engine"),
    "watermark_synthid_layers": ("Watermarks", "SynthID's per-layer g-value lift (layer weights)"),
    "synthid_saturation": ("Watermarks", "summing vs keeping the largest weight per table index"),
    "detect_eval": ("Detection", "TPR, queries to flag and benign FPR on held-out arena traffic"),
    "detect_throughput": ("Detection", "requests scored per second and per CPU-second"),
    "detect_embed_cost": ("Detection", "CPU per prompt of MiniLM and cheaper encoders"),
    "linking_eval": ("Detection", "account linking with popular prompts, apps and NATs"),
    "detect_scale": ("Detection", "detection over a provider's history at scale"),
    "detect_scale_duckdb": (
        "Detection",
        "the same detection as a partitioned job on DuckDB, out of core, against the replay",
    ),
    "detect_fpr": ("Detection", "false-positive rate of detection on held-out benign traffic"),
    "detect_calibration_cli": (
        "Detection",
        "what `detect --calibrate` shows and flags at a small and a larger calibration",
    ),
    "detect_adaptive": ("Detection", "adaptive attackers against the detectors"),
    "tail_floor_rules": (
        "Detection",
        "the tail-floor rules side by side (old, below the null, below the calibrated threshold)",
    ),
    "detector_follow": (
        "Detection",
        "the external detector following the ledger vs the in-process monitor, per CPU-second",
    ),
    "inprocess_lease_latency": (
        "Detection",
        "commit-to-verdict latency: the in-memory queue vs the lease holder's ledger feed "
        "(its own requests, another replica's)",
    ),
    "arena_traffic": ("Arena", "traffic generation speed"),
    "demo": ("Arena", "distillguard demo: the whole story on the embedded defaults"),
    "journeys": (
        "Arena",
        "the actors' walkthroughs (provider, distiller, investigator) as written, at real sizes",
    ),
    "harvest_throughput": ("Distillation", "the harvester vs a bare aiohttp client"),
    "harvest_sharegpt600": (
        "Distillation",
        "600 ShareGPT prompts at --concurrency 16 through the guarded gateway: one run, statuses",
    ),
    "harvest_answer_length": (
        "Distillation",
        "the embedded teacher's answer lengths on ShareGPT prompts (harvest's default --max-tokens)",
    ),
    "harvest_prompt_length": (
        "Distillation",
        "ShareGPT prompt lengths in the teacher's tokens, and what each --max-prompt-tokens keeps",
    ),
    "distill_curves": ("Distillation", "learning curves: held-out NLL vs teacher queries"),
    "distill_train_speed": (
        "Distillation",
        "training tokens per CPU-second, before/after and fp32/bf16",
    ),
    "distill_answers": ("Distillation", "the students' and teacher's greedy answers with rep4"),
    "distill_decoding": ("Distillation", "decoding options against the students' loops"),
    "distill_onpolicy": ("Distillation", "on-policy GKD after top-k KD"),
    "student_cost": ("Distillation", "a student's CPU per token vs the teacher's"),
    "student_head_rank": ("Distillation", "a rank-r SVD output head: cost and the teacher's NLL"),
    "student_factored_head": ("Distillation", "a factored output head, trained"),
    "prune_choice": ("Distillation", "which layers a pruned student keeps"),
    "radioactivity": (
        "Forensics",
        "radioactivity tests on students trained on watermarked answers",
    ),
    "forensics_false_rate": (
        "Forensics",
        "how often forensics report says 'distilled' of suspects that were not, and of ones that were",
    ),
    "scrub_evidence": (
        "Forensics",
        "watermark evidence vs a distiller's scrubbing (deletion, synonyms, swaps, truncation, "
        "mixing) and canaries dropped by an outlier filter",
    ),
    "scrub_student": (
        "Forensics",
        "radioactivity of a student trained on a scrubbed harvest, and what the scrub cost it "
        "(tiny teacher and student)",
    ),
    "radioactivity_filter": (
        "Forensics",
        "the training-data n-gram filter of radioactivity: power on students of the data, false "
        "positives over 200 accounts' own data on suspects that never saw it",
    ),
}
AREAS = [
    "Gateway and serving",
    "Guard",
    "Watermarks",
    "Detection",
    "Arena",
    "Distillation",
    "Forensics",
]

# The command that wrote a file, where the file does not record it itself (as the README and the
# bench docstrings give them).
COMMANDS = {
    "gateway_overhead.json": "python bench/gateway_overhead.py --duration 10 --concurrency 1,64 --rounds 3",
    "serve_throughput.json": "python bench/serve_throughput.py --threads 1",
    "prefill_fairness.json": "python bench/prefill_fairness.py",
    "policy_impact.json": "python bench/policy_impact.py",
    "antidistill.json": "nice -n 5 python bench/antidistill.py --prompts 32 --eval-prompts 16 --downstream 48 --downstream-test 24 --tokens 48 --lambdas 0,0.5,1 --seeds 2 --steps 16",
    "antidistill_control.json": "nice -n 5 python bench/antidistill.py --prompts 32 --eval-prompts 16 --downstream 48 --downstream-test 24 --tokens 48 --lambdas 0 --random-lambdas 1 --seeds 2 --steps 16",
    "watermark_quality.json": "nice -n 10 python bench/watermark_quality.py --grid --deltas 2 --batch 48 --threads 1 --null-keys 20 --fpr-texts 0 --cached-only",
    "watermark_quality_synthid_sum.json": "python bench/watermark_quality.py --grid --deltas 2 --batch 48 --threads 2 --null-keys 20 --fpr-texts 0 --cached-only --only synthid --json bench/results/watermark_quality_synthid_sum.json",
    "watermark_fpr_synthid.json": "python bench/watermark_quality.py --only-fpr --fpr-scheme synthid --fpr-prompt-tokens 16 --fpr-detectors plain,layers,teacher-layers",
    "watermark_overhead_synthid.json": "nice -n 10 python bench/watermark_overhead.py --rounds 3 --threads 1 --conditions none,synthid,keyed-hash",
    "watermark_synthid_layers.json": "python bench/watermark_synthid_layers.py --threads 1 --json bench/results/watermark_synthid_layers.json",
    "synthid_saturation.json": "nice -n 10 python bench/synthid_saturation.py",
    "radioactivity_synthid.json": "nice -n 10 python bench/radioactivity.py --scheme synthid --train 96 --eval 16 --leaked-prompts 24 --epochs 3 --student prune:8 --lr 5e-4 --batch-size 4 --null-keys 200 --top-k 32 --out bench/results/radioactivity_synthid.json",
    "radioactivity_synthid_e8_rho0-0.05.json": "the radioactivity_synthid.json command plus --epochs 8 --rhos 0,0.05 --skip-controls",
    "radioactivity_synthid_rho1_e8.json": "the radioactivity_synthid.json command plus --epochs 8 --rhos 1 --skip-controls",
    "radioactivity_filter.json": "chrt -i 0 nice -n 19 python bench/radioactivity_filter.py",
    "detect_eval.json": "nice -n 10 python bench/detect_eval.py --cal-accounts 1600 --eval-accounts 300 --attackers 5 --hydras 2 --campaign-requests 600",
    "detect_eval_benign750.json": "nice -n 10 python bench/detect_eval.py --cal-accounts 1600 --eval-accounts 750 --kinds slowlow --attackers 5 --campaign-requests 600 --out bench/results/detect_eval_benign750.json",
    "detect_eval_20attackers.json": "nice -n 10 python bench/detect_eval.py --cal-accounts 1600 --eval-accounts 300 --attackers 20 --hydras 2 --campaign-requests 600 --out bench/results/detect_eval_20attackers.json --plot bench/results/detect_roc_20attackers.png",
    "detector_follow.json": "nice -n 10 python bench/detector_follow.py --requests 3000 --rounds 5 --out bench/results/detector_follow.json",
    "inprocess_lease_latency.json": "nice -n 5 python bench/inprocess_lease_latency.py --out bench/results/inprocess_lease_latency.json",
    "detect_embed_cost.json": "nice -n 10 python bench/detect_embed_cost.py --prompts 512",
    "detect_throughput_quiet.json": "python bench/detect_throughput.py --threads 1 --embed-workers 2 --requests 1500",
    "detect_throughput_quiet_mixed.json": "python bench/detect_throughput.py --threads 1 --embed-workers 2 --requests 1500 --benign-accounts 1000",
    "detect_throughput_quiet_3000.json": "python bench/detect_throughput.py --threads 1 --embed-workers 2 --requests 3000 --batch 1024",
    "linking_eval.json": "python bench/linking_eval.py --seed 51",
    "harvest_throughput.json": "python bench/harvest_throughput.py --requests 2000 --repeats 11",
    "harvest_throughput_3000.json": "python bench/harvest_throughput.py --requests 3000 --repeats 11",
    "distill_train_speed.json": "nice -n 10 python bench/distill_train_speed.py --data DIR --examples 32 --repeats 1",
    "distill_train_speed_precision.json": "nice -n 5 python bench/distill_train_speed.py --compare precision --student prune:11 --losses sft,topk-kd,kd --repeats 2 --data DIR",
    "distill_curves.json": "python bench/distill_curves.py ... then --report-only (each point records its settings)",
    "distill_curves_gpu.json": "bash bench/distill_curves_gpu.sh",
    "distill_curves.md": "python bench/distill_curves.py --report-only --sizes 16,64,250,500,1000,4000 --depths 8,11,15,18 --inits influence,even,block,influence:mlp896,influence:mlp640 (written from the points of distill_curves.json and distill_curves_gpu.json)",
    "distill_curves_samples.md": "written with distill_curves.md by python bench/distill_curves.py --report-only",
    "prune_choice_11.md": "nice -n 5 python bench/prune_choice.py --depth 11",
    "distill_curves_top20/distill_curves.json": "nice -n 5 python bench/distill_curves.py --work ~/.cache/distillguard/bench/distill_curves_top20 --top-logprobs 20 --sizes 1000 --losses topk-kd --precision bf16 --threads 1 --keep-students, with --depths 15 --inits influence:mlp896 and --depths 11 --inits influence (a harvest of its own)",
    "distill_decoding.json": "nice -n 5 python bench/distill_decoding.py --student .../topk-kd-prune11-influence-n4000 --student .../sft-prune11-influence-n4000",
    "distill_decoding_n4000x4.json": "python bench/distill_decoding.py --student .../topk-kd-prune11-influence-n4000x4-bf16 --out bench/results/distill_decoding_n4000x4.json",
    "distill_answers_ul1_n4000.json": "nice -n 5 python bench/distill_decoding.py --student .../topk-kd-prune15-influence:mlp896-n4000-bf16-ul1 --student .../topk-kd-prune15-influence:mlp896-n4000-bf16 --decodings greedy --samples 32 --threads 1 --out bench/results/distill_answers_ul1_n4000.json",
    "distill_onpolicy.json": "nice -n 5 python bench/distill_onpolicy.py --student .../topk-kd-prune11-influence-n4000 --max-train 800",
    "student_cost.json": "nice -n 10 python bench/student_cost.py --depths 8,11,15",
    "student_cost_quiet.json": "python bench/student_cost.py --depths 8,11,13,15 --rounds 7",
    "student_cost_width.json": "nice -n 5 python bench/student_cost.py --depths 11,15 --students prune:15:mlp768,prune:15:mlp896,prune:20:mlp512,prune:18:mlp640 --rounds 5 --threads 1 --out bench/results/student_cost_width.json",
    "student_cost_width_repeat.json": "python bench/student_cost.py --depths 11 --students prune:15:mlp896 --rounds 7",
    "student_head_rank.json": "python bench/student_head_rank.py",
    "student_factored_head_r144_prune15_topk-kd_n1000.json": "nice -n 5 python bench/student_factored_head.py --rank 144 --depth 15 --queries 1000 --loss topk-kd",
    "student_factored_head_r144_prune15_sft_n1000.json": "nice -n 5 python bench/student_factored_head.py --rank 144 --depth 15 --queries 1000 --loss sft",
    "prune_choice_11.json": "nice -n 5 python bench/prune_choice.py --depth 11",
}

# Figures that belong on a page whose name is not theirs.
FIGURES = {
    "detect_roc.png": "detect_eval",
    "detect_roc_20attackers.png": "detect_eval_20attackers",
    "watermark_detection.png": "watermark_quality",
    "watermark_detection_synthid_sum.png": "watermark_quality_synthid_sum",
}

HEADER = "<!-- Generated by `python scripts/gen_results.py` from bench/results/: do not edit by hand. -->"


def page_name(rel: Path) -> str:
    """``distill_curves_top20/distill_curves.json`` -> ``distill_curves_top20-distill_curves``."""
    return "-".join(rel.with_suffix("").parts)


def bench_of(stem: str, data: object) -> str | None:
    """The bench that wrote a file: its own ``bench`` field, else the longest known prefix."""
    if isinstance(data, dict) and isinstance(data.get("bench"), str):
        # some files say more than the name ("watermark_quality --only-fpr")
        name = data["bench"].split()[0]
        if name in BENCHES or name in RETIRED:
            return name
    known = sorted(set(BENCHES) | set(RETIRED), key=len, reverse=True)
    for name in known:
        if stem == name or stem.startswith(name + "_"):
            return name
    return None


def fmt(value: object) -> str:
    """One cell. Floats keep 4 significant digits (the docs quote no more); text is escaped so a
    prompt or an answer cannot break the table."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    text = html.escape(str(value), quote=False)
    for char, entity in (("|", "&#124;"), ("*", "&#42;"), ("_", "&#95;"), ("`", "&#96;")):
        text = text.replace(char, entity)
    text = text.replace("[", "&#91;").replace("]", "&#93;")
    return text.replace("\r", "").replace("\n", "<br>")


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def flat(record: dict, prefix: str = "", depth: int = 0) -> dict[str, object]:
    """A record's scalar leaves as dotted keys, two levels deep; short scalar lists inline."""
    out: dict[str, object] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if is_scalar(value):
            out[name] = value
        elif isinstance(value, dict) and depth < 2:
            out.update(flat(value, name + ".", depth + 1))
        elif isinstance(value, list) and len(value) <= 8 and all(is_scalar(v) for v in value):
            out[name] = ", ".join(fmt(v) for v in value)
        else:
            out[name] = _nested_note(value)
    return out


def _nested_note(value: object) -> str:
    size = len(value) if isinstance(value, list | dict) else 1
    return f"({size} items, in the JSON file)"


def table(rows: list[dict[str, object]], first: str | None = None) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    if first:
        columns = [first] + [c for c in columns if c != first]
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(v if _is_note(v) else fmt(v) for v in cells) + " |")
    return lines


def _is_note(value: object) -> bool:
    return isinstance(value, str) and value.endswith("in the JSON file)")


def kv_table(mapping: dict[str, object]) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    for key, value in mapping.items():
        lines.append(f"| {fmt(key)} | {value if _is_note(value) else fmt(value)} |")
    return lines


def records(value: object) -> list[dict] | None:
    """A list of records, or a mapping of records (its keys become the first column)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [flat(v) for v in value]
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        if all(
            all(is_scalar(x) or isinstance(x, dict | list) for x in v.values())
            for v in value.values()
        ):
            return [{"": k, **flat(v)} for k, v in value.items()]
    return None


def render(value: object, title: str, level: int) -> list[str]:
    heading = "#" * min(level, 6)
    lines = [f"{heading} {fmt(title)}", ""]
    if is_scalar(value):
        return lines + [fmt(value), ""]
    if isinstance(value, list) and all(is_scalar(v) for v in value):
        return lines + [", ".join(fmt(v) for v in value) or "(empty)", ""]
    rows = records(value)
    if rows is not None and len({k for r in rows for k in r}) <= 24:
        lines += table(rows, first="" if isinstance(value, dict) else None) + [""]
        # what a table cell could only point at gets a section of its own
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for sub, subvalue in item.items():
                if not is_scalar(subvalue) and _is_note(flat({sub: subvalue}).get(sub)):
                    lines += render(subvalue, f"{key} / {sub}", level + 1)
        return lines
    if isinstance(value, dict):
        scalars = {k: v for k, v in value.items() if is_scalar(v)}
        if scalars:
            lines += kv_table(scalars) + [""]
        for key, sub in value.items():
            if not is_scalar(sub):
                lines += render(sub, str(key), level + 1)
        return lines
    for i, item in enumerate(value):
        lines += render(item, f"{title} [{i}]", level + 1)
    return lines


def source_lines(rel: Path, data: object) -> list[str]:
    stem = rel.stem
    bench = bench_of(stem, data)
    lines = [f"Source: `bench/results/{rel.as_posix()}`."]
    if bench in RETIRED:
        lines.append(
            f"Written by `bench/{bench}.py`, since retired: see [its decision record]({RETIRED[bench]})."
        )
    elif bench and (ROOT / "bench" / f"{bench}.py").exists():
        lines.append(f"Written by `bench/{bench}.py`.")
    command = data.get("command") if isinstance(data, dict) else None
    command = command if isinstance(command, str) else COMMANDS.get(rel.as_posix())
    if command:
        lines.append(f"Command: `{command}`.")
    return [" ".join(lines), ""]


def figure_lines(stem: str, figures: dict[str, list[Path]]) -> list[str]:
    lines = []
    for png in figures.get(stem, []):
        lines += [f"![{png.name}](img/{png.as_posix()})", ""]
    return lines


def json_page(rel: Path, figures: dict[str, list[Path]]) -> str:
    data = json.loads((RESULTS / rel).read_text())
    lines = [HEADER, "", f"# {rel.as_posix()}", ""]
    lines += source_lines(rel, data)
    lines += figure_lines(page_name(rel), figures)
    if isinstance(data, dict):
        scalars = {k: v for k, v in data.items() if is_scalar(v) and k != "command"}
        if scalars:
            lines += kv_table(scalars) + [""]
        for key, value in data.items():
            if not is_scalar(value):
                lines += render(value, str(key), 2)
    else:
        lines += render(data, "results", 2)
    return "\n".join(lines).rstrip() + "\n"


def md_page(rel: Path, figures: dict[str, list[Path]]) -> str:
    """A report a bench wrote as Markdown, shown as it is (headings moved one level down)."""
    body = (RESULTS / rel).read_text()
    shifted = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
    lines = [HEADER, "", f"# {rel.as_posix()}", ""]
    lines += source_lines(rel, {})
    lines += figure_lines(page_name(rel), figures)
    return "\n".join(lines) + "\n" + shifted.rstrip() + "\n"


def index_page(pages: list[tuple[Path, str]]) -> str:
    by_area: dict[str, list[str]] = {area: [] for area in AREAS}
    by_area["Other"] = []
    for rel, name in pages:
        bench = bench_of(rel.stem, {})
        try:
            bench = bench_of(rel.stem, json.loads((RESULTS / rel).read_text()))
        except (ValueError, UnicodeDecodeError):
            pass
        # the file's own name describes it best where it has an entry (watermark_fpr, written by
        # watermark_quality), else the bench that wrote it
        named = bench_of(rel.stem, {})
        area, what = BENCHES.get(named if named in BENCHES else bench or "", ("Other", ""))
        retired = " (retired bench)" if bench in RETIRED else ""
        by_area[area].append(f"| [{rel.as_posix()}]({name}.md) | {what}{retired} |")
    lines = [
        HEADER,
        "",
        "# Results",
        "",
        "Every committed result file of `bench/`, rendered as it is. The concept pages and the",
        "decision records quote these files; the numbers are the files', never typed by hand.",
        "Regenerate after a bench writes a new file: `python scripts/gen_results.py`.",
        "",
    ]
    for area, rows in by_area.items():
        if rows:
            lines += [f"## {area}", "", "| file | what it measures |", "|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def generate(out: Path) -> list[Path]:
    """Write every results page into ``out`` (emptied first); returns the pages written."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sources = sorted(
        p.relative_to(RESULTS) for p in RESULTS.rglob("*") if p.suffix in (".json", ".md")
    )
    figures: dict[str, list[Path]] = {}
    for png in sorted(p.relative_to(RESULTS) for p in RESULTS.rglob("*.png")):
        owner = FIGURES.get(png.as_posix(), page_name(png))
        figures.setdefault(owner, []).append(png)
    pages = []
    written = []
    for rel in sources:
        name = page_name(rel)
        if rel.suffix == ".md":
            name += "-report"  # distill_curves.md beside distill_curves.json
            text = md_page(
                rel, figures if not (RESULTS / rel.with_suffix(".json")).exists() else {}
            )
        else:
            text = json_page(rel, figures)
        (out / f"{name}.md").write_text(text)
        pages.append((rel, name))
        written.append(out / f"{name}.md")
    (out / "index.md").write_text(index_page(pages))
    written.append(out / "index.md")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default docs/results)")
    args = ap.parse_args()
    written = generate(args.out)
    print(f"wrote {len(written)} pages to {args.out}")


if __name__ == "__main__":
    main()
