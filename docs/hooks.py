"""MkDocs hooks (mkdocs.yml ``hooks:``): what the site takes from outside docs/ at build time.

- The CLI reference is rendered from the typer app itself (typer's own Markdown generator, the
  one behind ``typer MODULE utils docs``), so it is current at every build and never committed.
- bench/results/*.png are published under results/img/ for the generated results pages, instead
  of committed copies of them inside docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLI_MARKER = "<!-- cli-reference -->"
# Docstrings here cite code with Sphinx roles (:func:`load_model`); the site shows the name alone.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>)")


def cli_markdown() -> str:
    import typer.main
    from typer.cli import get_docs_for_click

    from distillguard.cli import app

    command = typer.main.get_command(app)
    docs = get_docs_for_click(obj=command, ctx=typer.Context(command), name="distillguard")
    lines, fenced = [], False
    for line in docs.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            pass
        elif line.startswith("#"):
            line = "#" + line  # the page has its own title: every heading goes one level down
        elif line.startswith("  distillguard "):
            # an example command in a help text: a code block, not a paragraph
            if len(lines) > 1 and lines[-1] == "" and lines[-2].startswith("    distillguard"):
                lines.pop()  # the blank line typer puts between examples: one block
            line = "    " + line.strip()
        elif not fenced:
            # help texts write option syntax such as prune:K[:mlpW], which Markdown (and
            # mkdocs-autorefs) would read as reference links
            line = line.replace("[", "\\[")
        lines.append(line)
    return "\n".join(lines)


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        uri = "results/img/" + png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        return markdown.replace(CLI_MARKER, cli_markdown())
    return markdown


def on_page_content(html, page, config, files):
    return SPHINX_ROLE.sub("", html)
