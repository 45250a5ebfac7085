"""A picture of generated traffic, to check it by eye before trusting an evaluation on it.

Left: requests per hour by label over the window (benign users' days and nights, campaigns'
bursts). Right: one dot per account, its number of requests against the share of its requests
that continue a conversation; benign users spread along the top (heavy users to the right),
single-turn campaigns sit at the bottom, hydra keys in between (their decoy conversations).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from distillguard.errors import ConfigError


def plot_traffic(records: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Draw ``records`` (traffic-log dicts with ``label``) to an image file; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dev dependency only
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from None
    if not records:
        raise ConfigError("no traffic to plot")
    path = Path(path)
    start = min(r["ts"] for r in records)
    labels = sorted({r.get("label", "?") for r in records}, key=lambda x: (x != "benign", x))
    colours = {lab: f"C{i}" for i, lab in enumerate(labels)}

    hourly: dict[str, Counter] = defaultdict(Counter)
    per_account: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        hourly[r.get("label", "?")][int((r["ts"] - start) // 3600)] += 1
        per_account[r["account"]].append(r)
    hours = range(max(h for c in hourly.values() for h in c) + 1)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for lab in labels:
        ax1.plot(
            [h / 24 for h in hours],
            [hourly[lab][h] for h in hours],
            label=lab,
            color=colours[lab],
            lw=1,
        )
    ax1.set(xlabel="day", ylabel="requests per hour", yscale="symlog", title="traffic over time")
    ax1.legend(fontsize=8)
    for lab in labels:
        xs, ys = [], []
        for recs in per_account.values():
            if recs[0].get("label", "?") != lab:
                continue
            xs.append(len(recs))
            ys.append(
                sum(any(m["role"] == "assistant" for m in r["request"]["messages"]) for r in recs)
                / len(recs)
            )
        ax2.scatter(xs, ys, s=12, alpha=0.7, color=colours[lab], label=lab)
    ax2.set(
        xscale="log",
        xlabel="requests per account",
        ylabel="share of follow-up requests",
        title="accounts",
    )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
