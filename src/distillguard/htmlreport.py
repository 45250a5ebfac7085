"""What the project's HTML reports share (``forensics report``'s and ``demo``'s report.html):
numbers shown one way, matplotlib figures embedded as ``data:`` PNGs, and one page shell with
no script and no external URL, so a report opens offline and can be mailed as one file."""

from __future__ import annotations

import base64
import html
import io

CSS = """
body { font-family: sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
code { font-size: .85em; word-break: break-all; }
figure { display: inline-block; margin: 1em; }
"""


def fmt(x) -> str:
    """How a number is shown; the browser tests parse it back and compare with the JSON."""
    if x is None:
        return "–"
    return f"{x:.3g}"


def figure_png(fig, dpi: int = 90) -> str:
    """A matplotlib figure as base64 PNG (for ``src="data:image/png;base64,..."``); closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figure_html(png_base64: str, alt: str, caption: str = "") -> str:
    """An embedded plot; ``caption`` is HTML (escape what it quotes)."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64}">'
        f"{cap}</figure>"
    )


def page(title: str, body: str, css: str = "") -> str:
    """A whole self-contained document around ``body`` (HTML)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{CSS}{css}</style></head><body>
{body}
</body></html>
"""


__all__ = ["CSS", "figure_html", "figure_png", "fmt", "page"]
