"""The docs site: generated results pages are current, the site builds with --strict, and the
README stays a front door whose numbers and commands point at things that exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _gen_results():
    spec = importlib.util.spec_from_file_location(
        "gen_results", ROOT / "scripts" / "gen_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_pages_are_current(tmp_path):
    out = tmp_path / "results"
    _gen_results().generate(out)
    fresh = {p.name: p.read_text() for p in out.glob("*.md")}
    committed = {p.name: p.read_text() for p in (DOCS / "results").glob("*.md")}
    fix = "run `python scripts/gen_results.py` and commit docs/results/"
    assert sorted(fresh) == sorted(committed), f"results pages added or removed: {fix}"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"results pages out of date ({', '.join(stale)}): {fix}"


def test_results_pages_render_the_files_numbers():
    # a known cell of a known file: the generator shows the file's value, not a typed one
    gen = _gen_results()
    page = (DOCS / "results" / "gateway_overhead.md").read_text()
    data = json.loads((ROOT / "bench" / "results" / "gateway_overhead.json").read_text())
    value = data["overhead_vs_direct"]["requests_per_s_vs_litellm"]["distillguard"]["64"]
    assert gen.fmt(value) in page
    assert gen.fmt(0.000505050505050505) == "0.0005051"
    assert gen.fmt(31640.5) == "31,640.5"
    assert gen.fmt("a|b <think>") == "a&#124;b &lt;think&gt;"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    index = (site / "index.html").read_text()
    # theme.font is off: the site builds and reads offline, no Google Fonts
    assert "fonts.googleapis.com" not in index
    cli = (site / "cli" / "index.html").read_text()
    assert "distillguard serve" in cli and "--upstream" in cli  # rendered from the typer app
    assert (site / "results" / "img" / "distill_curves.png").is_file()
    api = (site / "api" / "index.html").read_text()
    assert "WatermarkParams" in api and "HarvestConfig" in api and "DistillguardError" in api
    assert ":func:<code>" not in api and ":class:<code>" not in api  # Sphinx roles stripped


README = (ROOT / "README.md").read_text()


def test_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference into docs/"
    code = [
        line
        for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
        for line in block.splitlines()
    ]
    # what users and CI run; .ci/run runs the second one
    assert code[0] == (
        "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e '.[dev]' && "
        ".venv/bin/pip install --no-deps -r requirements-embedded.txt && .venv/bin/distillguard demo"
    )
    assert code[1] == ".venv/bin/python -m pytest -q --durations=25"
    ci = (ROOT / ".ci" / "run").read_text()
    assert code[1] in ci, ".ci/run must run the README's test command (keep the two in sync)"


def _doc_texts():
    yield ROOT / "README.md", README
    for page in DOCS.rglob("*.md"):
        if page.parent.name != "results":
            yield page, page.read_text()


def test_cited_result_files_exist():
    missing = []
    for page, text in _doc_texts():
        for rel in re.findall(r"bench/results/([\w.\-/]+\.(?:json|md|png))", text):
            if not (ROOT / "bench" / "results" / rel).exists():
                missing.append(f"{page.relative_to(ROOT)}: bench/results/{rel}")
    assert not missing, "cited result files that are not committed: " + "; ".join(missing)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_cited_bench_scripts_exist_or_name_their_commit():
    """A bench script the docs cite is in the tree, or retired with the commit that holds it."""
    problems = []
    for page, text in _doc_texts():
        for name in sorted(set(re.findall(r"bench/(\w+)\.(?:py|sh)", text))):
            if list((ROOT / "bench").glob(f"{name}.*")):
                continue
            commits = re.findall(rf"git show ([0-9a-f]{{7,40}}):bench/{name}\.py", text)
            ok = commits and all(
                subprocess.run(
                    ["git", "cat-file", "-e", f"{c}:bench/{name}.py"], cwd=ROOT, capture_output=True
                ).returncode
                == 0
                for c in commits
            )
            if not ok:
                problems.append(f"{page.relative_to(ROOT)}: bench/{name}.py")
    assert not problems, "bench scripts cited but neither in the tree nor at a named commit: " + (
        "; ".join(problems)
    )


def test_readme_links_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
