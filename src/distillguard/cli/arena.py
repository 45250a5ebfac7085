"""``distillguard arena``: labelled evaluation traffic (benign users and extraction campaigns)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.table import Table

from distillguard.arena.traffic import TrafficConfig
from distillguard.cli.common import console, err_console
from distillguard.cli.options import option

arena_app = typer.Typer(
    help="Benign users and extraction campaigns for evaluating detectors.", no_args_is_help=True
)


@arena_app.command("traffic")
def traffic(
    # defaults and help are TrafficConfig's (cli/options.py): written once, there
    benign_accounts: int = option(TrafficConfig, "benign_accounts", "--benign-accounts", "-b"),
    # text specs on the command line, parsed into the config's CampaignSpecs
    campaign: list[str] | None = typer.Option(
        None,
        "--campaign",
        "-c",
        help="KIND[:ACCOUNTS[:REQUESTS]] (repeatable); REQUESTS is per account",
    ),
    seed: int = option(TrafficConfig, "seed"),
    days: float = option(TrafficConfig, "days"),
    pool: str = option(TrafficConfig, "pool"),
    start: float = option(TrafficConfig, "start"),
    model: str = option(TrafficConfig, "model"),
    rpm_limit: int = option(TrafficConfig, "rpm_limit"),
    decoy_share: float = option(TrafficConfig, "decoy_share"),
    whole_conversations: bool = option(TrafficConfig, "whole_conversations"),
    popular_prompts: int = option(TrafficConfig, "popular_prompts"),
    popular_share: float = option(TrafficConfig, "popular_share"),
    popular_zipf: float = option(TrafficConfig, "popular_zipf"),
    app_share: float = option(TrafficConfig, "app_share"),
    apps: int = option(TrafficConfig, "apps"),
    nat_share: float = option(TrafficConfig, "nat_share"),
    nat_size: int = option(TrafficConfig, "nat_size"),
    output: str | None = typer.Option(
        None, "--output", "-o", help="JSONL file to write, - for standard output"
    ),
    plot: str | None = typer.Option(
        None, help="also draw the traffic to this image file (needs matplotlib)"
    ),
    list_kinds: bool = typer.Option(False, "--list-kinds", help="list the campaign kinds and exit"),
) -> None:
    """Write labelled traffic (DESIGN.md traffic log): benign users and attack campaigns.

    Benign users replay real ShareGPT conversations (follow-up turns with the earlier answers,
    human timing, a few topics each; some heavy users, researchers asking for logprobs, apps
    with one system prompt). Campaigns draw on a disjoint attack pool. Every record has
    "label" ("benign" or the campaign kind) and campaign records "campaign" ("<kind>-<i>"):
    ground truth for evaluation, never for detectors.

    Examples:

      distillguard arena traffic -b 200 -c bulk -c hydra:20 -c slowlow -o eval.jsonl

      distillguard arena traffic -b 500 --pool calibration --seed 1 -o calibration.jsonl

      distillguard arena traffic -b 300 -c bulk -c template -c reasoning -c logprobs -c hydra -c slowlow \\
          --days 7 -o all.jsonl --plot all.png

      distillguard arena traffic -b 0 -c template:1:500 -o - | head
    """
    from distillguard.arena.traffic import CampaignSpec, campaign_kinds, generate_traffic
    from distillguard.errors import ConfigError

    if list_kinds:
        table = Table("kind", "accounts", "requests/account", "what it does")
        for kind in campaign_kinds().values():
            table.add_row(
                kind.name, str(kind.default_accounts), str(kind.default_requests), kind.description
            )
        console.print(table)
        return
    if output is None:
        raise ConfigError("no output file: pass -o FILE.jsonl (or -o - for standard output)")
    if pool not in ("calibration", "eval"):
        raise ConfigError(f"--pool must be calibration or eval, got {pool!r}")
    specs = tuple(CampaignSpec.parse(c) for c in campaign or ())
    try:
        config = TrafficConfig(
            benign_accounts=benign_accounts,
            campaigns=specs,
            seed=seed,
            days=days,
            pool=pool,
            model=model,
            rpm_limit=rpm_limit,
            decoy_share=decoy_share,
            whole_conversations=whole_conversations,
            popular_prompts=popular_prompts,
            popular_share=popular_share,
            app_share=app_share,
            apps=apps,
            nat_share=nat_share,
            nat_size=nat_size,
            popular_zipf=popular_zipf,
            start=start,
        )
    except ValidationError as exc:  # name the option, not the config field
        err = exc.errors(include_url=False)[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"--{str(err['loc'][0]).replace('_', '-')}: {msg}" if err["loc"] else msg
        ) from None
    with err_console.status("generating traffic ..."):
        records = generate_traffic(config)
    out = sys.stdout if output == "-" else _open(Path(output))
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    table = Table(title=f"{len(records)} requests → {output}")
    for col in ("label", "accounts", "requests"):
        table.add_column(col, justify="left" if col == "label" else "right")
    accounts: dict[str, set] = {}
    for r in records:
        accounts.setdefault(r["label"], set()).add(r["account"])
    for label, n in Counter(r["label"] for r in records).items():
        table.add_row(label, str(len(accounts[label])), str(n))
    err_console.print(table)
    if plot:
        from distillguard.arena.plot import plot_traffic

        err_console.print(
            f"plot: {plot_traffic(records, plot, title=f'{len(records)} requests, seed {seed}')}"
        )


def _open(path: Path):
    from distillguard.errors import ConfigError

    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path.open("w", encoding="utf-8")
