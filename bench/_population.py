"""The benign population's kinds (issue 23) as command-line flags, shared by the detection
evaluations (linking_eval.py, detect_fpr.py): the same flags, defaults and TrafficConfig fields."""

from __future__ import annotations

import argparse


def add_population_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--popular-prompts", type=int, default=300)
    ap.add_argument("--popular-share", type=float, default=0.3)
    ap.add_argument("--popular-zipf", type=float, default=1.0)
    ap.add_argument("--app-share", type=float, default=0.05)
    ap.add_argument("--apps", type=int, default=5)
    ap.add_argument("--nat-share", type=float, default=0.2, help="benign users behind large NATs")
    ap.add_argument("--nat-size", type=int, default=100)
    ap.add_argument("--days", type=float, default=2.0)


def population_kinds(args: argparse.Namespace) -> dict:
    """TrafficConfig keywords for the flags of :func:`add_population_args`."""
    return dict(
        popular_prompts=args.popular_prompts,
        popular_share=args.popular_share,
        popular_zipf=args.popular_zipf,
        app_share=args.app_share,
        apps=args.apps,
        nat_share=args.nat_share,
        nat_size=args.nat_size,
        days=args.days,
    )
