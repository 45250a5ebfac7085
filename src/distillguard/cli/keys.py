"""``distillguard keys``: create, list and revoke API keys on the ledger database."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from distillguard.cli import DB_HELP, console, err_console

keys_app = typer.Typer(help="Manage accounts' API keys (stored hashed; a key is shown once).", no_args_is_help=True)


def _store(db: str | None):
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.keys import KeyStore

    engine = make_engine(db)
    migrate(engine)
    return KeyStore(engine)


@keys_app.command("create")
def create(
    account: str = typer.Option(..., "--account", "-a", help="account the key belongs to (created if new)"),
    name: Optional[str] = typer.Option(None, help="a label for the key"),
    rpm: Optional[int] = typer.Option(None, help="requests per rolling minute"),
    tpm: Optional[int] = typer.Option(None, help="tokens (prompt + completion) per rolling minute"),
    max_concurrent: Optional[int] = typer.Option(None, help="requests in flight at once"),
    daily_tokens: Optional[int] = typer.Option(None, help="tokens per UTC day"),
    db: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the key record as JSON"),
) -> None:
    """Create an API key and print it (once: only its hash is stored).

    Examples:

      distillguard keys create --account acme

      distillguard keys create --account acme --rpm 60 --tpm 100000 --max-concurrent 4 --daily-tokens 2000000
    """
    from distillguard.guard.limits import Limits

    record, secret = _store(db).create(account, name=name, limits=Limits(
        rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, daily_tokens=daily_tokens))
    if as_json:
        print(json.dumps({**record.public(), "key": secret}))
    else:
        err_console.print(f"created key [bold]{record.id}[/] for account [bold]{record.account}[/]; "
                          "store it now, it is not shown again:")
        print(secret)


@keys_app.command("list")
def list_keys(
    account: Optional[str] = typer.Option(None, "--account", "-a", help="only this account's keys"),
    db: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """List keys (id, account, prefix, limits, status); never the keys themselves.

    Example: distillguard keys list --account acme
    """
    records = _store(db).list(account)
    if as_json:
        for r in records:
            print(json.dumps(r.public()))
        return
    table = Table("id", "account", "prefix", "rpm", "tpm", "concurrent", "daily tokens", "status")
    for r in records:
        table.add_row(r.id, r.account, r.prefix + "…", *(str(v) if v else "-" for v in (
            r.limits.rpm, r.limits.tpm, r.limits.max_concurrent, r.limits.daily_tokens)),
            "active" if r.active else "[red]revoked[/]")
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="the key's id (see `keys list`)"),
    db: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
) -> None:
    """Revoke a key: it stops working at once on this server's replicas (within 2 s on others).

    Example: distillguard keys revoke key_3f2a9c01b4d2
    """
    record = _store(db).revoke(key_id)
    err_console.print(f"revoked {record.id} ({record.account})")
