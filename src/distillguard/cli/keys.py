"""``distillguard keys`` (create, list, rotate, revoke API keys) and ``distillguard accounts``
(limits over all of an account's keys), on the ledger database."""

from __future__ import annotations

import json
import re
import time

import typer
from rich.table import Table

from distillguard.cli.common import DB_HELP, console, err_console
from distillguard.errors import ConfigError

keys_app = typer.Typer(
    help="Manage accounts' API keys (stored hashed; a key is shown once).", no_args_is_help=True
)
accounts_app = typer.Typer(
    help="Manage accounts: limits over all of an account's keys together.", no_args_is_help=True
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str, option: str) -> int:
    """Seconds in ``90``, ``90s``, ``30m``, ``1h``, ``7d`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d{1,12})\s*([smhdw]?)\s*", text)
    if match is None:
        raise ConfigError(f"{option} {text!r} is not a duration: use e.g. 90s, 30m, 1h, 7d or 2w")
    return int(match[1]) * _UNITS[match[2] or "s"]


def _store(db: str | None):
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.keys import KeyStore

    engine = make_engine(db)
    migrate(engine)
    return KeyStore(engine)


def _limits(rpm, tpm, max_concurrent, daily_tokens, daily_usd):
    from distillguard.guard.limits import Limits

    return Limits(
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        daily_tokens=daily_tokens,
        daily_usd=daily_usd,
    )


def _print_key(record, secret: str, as_json: bool, what: str) -> None:
    if as_json:
        print(json.dumps({**record.public(), "key": secret}))
    else:
        err_console.print(
            f"{what} key [bold]{record.id}[/] for account [bold]{record.account}[/]; "
            "store it now, it is not shown again:"
        )
        print(secret)


RPM = typer.Option(None, help="requests per rolling minute")
TPM = typer.Option(None, help="tokens (prompt + completion) per rolling minute")
CONCURRENT = typer.Option(None, help="requests in flight at once")
DAILY_TOKENS = typer.Option(None, help="tokens per UTC day")
DAILY_USD = typer.Option(
    None, help="US dollars per UTC day, at the server's prices (DISTILLGUARD_PRICES)"
)
DB = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP)


@keys_app.command("create")
def create(
    account: str = typer.Option(
        ...,
        "--account",
        "-a",
        help="account the key belongs to (created if new); 1-128 of A-Z a-z 0-9 . _ @ : + -",
    ),
    name: str | None = typer.Option(None, help="a label for the key"),
    rpm: int | None = RPM,
    tpm: int | None = TPM,
    max_concurrent: int | None = CONCURRENT,
    daily_tokens: int | None = DAILY_TOKENS,
    daily_usd: float | None = DAILY_USD,
    expires_in: str | None = typer.Option(
        None, help="the key stops working after this long (90s, 30m, 1h, 7d)"
    ),
    model: list[str] | None = typer.Option(
        None,
        "--model",
        "-m",
        help="a model id the key may use (repeat for several; default: every model)",
    ),
    db: str | None = DB,
    as_json: bool = typer.Option(False, "--json", help="print the key record as JSON"),
) -> None:
    """Create an API key and print it (once: only its hash is stored).

    Examples:

      distillguard keys create --account acme

      distillguard keys create --account acme --rpm 60 --tpm 100000 --max-concurrent 4 --daily-tokens 2000000

      distillguard keys create --account acme --model tiny --expires-in 30d
    """
    expires_at = time.time() + parse_duration(expires_in, "--expires-in") if expires_in else None
    record, secret = _store(db).create(
        account,
        name=name,
        limits=_limits(rpm, tpm, max_concurrent, daily_tokens, daily_usd),
        expires_at=expires_at,
        models=model or None,
    )
    _print_key(record, secret, as_json, "created")


@keys_app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="the key's id (see `keys list`)"),
    grace: str = typer.Option("1h", help="how long the old key keeps working (0 ends it now)"),
    expires_in: str | None = typer.Option(None, help="the new key stops working after this long"),
    db: str | None = DB,
    as_json: bool = typer.Option(False, "--json", help="print the new key record as JSON"),
) -> None:
    """Replace a key: a new key for the same account, limits and models; the old one expires
    after the grace period, so clients can switch without an outage.

    Example: distillguard keys rotate key_3f2a9c01b4d2 --grace 1h
    """
    expires_at = time.time() + parse_duration(expires_in, "--expires-in") if expires_in else None
    new, secret, old = _store(db).rotate(
        key_id, grace_s=parse_duration(grace, "--grace"), expires_at=expires_at
    )
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(old.expires_at))
    err_console.print(f"{old.id} stops working at {until}")
    _print_key(new, secret, as_json, "rotated to")


@keys_app.command("list")
def list_keys(
    account: str | None = typer.Option(None, "--account", "-a", help="only this account's keys"),
    db: str | None = DB,
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
    table = Table(
        "id",
        "account",
        "prefix",
        "rpm",
        "tpm",
        "concurrent",
        "daily tokens",
        "daily $",
        "models",
        "status",
    )
    for r in records:
        status = (
            "[red]revoked[/]"
            if not r.active
            else "[red]expired[/]"
            if r.expired()
            else "active"
            if r.expires_at is None
            else f"until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.expires_at))}"
        )
        table.add_row(
            r.id,
            r.account,
            r.prefix + "…",
            *(
                str(v) if v else "-"
                for v in (
                    r.limits.rpm,
                    r.limits.tpm,
                    r.limits.max_concurrent,
                    r.limits.daily_tokens,
                    r.limits.daily_usd,
                )
            ),
            ",".join(r.models) if r.models else "all",
            status,
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="the key's id (see `keys list`)"),
    db: str | None = DB,
) -> None:
    """Revoke a key: it stops working at once on this server's replicas (within 2 s on others).

    Example: distillguard keys revoke key_3f2a9c01b4d2
    """
    record = _store(db).revoke(key_id)
    err_console.print(f"revoked {record.id} ({record.account})")


@accounts_app.command("set-limits")
def set_limits(
    account: str = typer.Argument(..., help="the account (created if new)"),
    rpm: int | None = RPM,
    tpm: int | None = TPM,
    max_concurrent: int | None = CONCURRENT,
    daily_tokens: int | None = DAILY_TOKENS,
    daily_usd: float | None = DAILY_USD,
    db: str | None = DB,
) -> None:
    """Set the limits over all of an account's keys together (those not given: unlimited). Each
    key's own limits still hold within them. Servers apply them within 2 s.

    Example: distillguard accounts set-limits acme --rpm 600 --daily-tokens 5000000 --daily-usd 20
    """
    limits = _store(db).set_account_limits(
        account, _limits(rpm, tpm, max_concurrent, daily_tokens, daily_usd)
    )
    print(json.dumps({"account": account, **limits.public()}))


@accounts_app.command("show")
def show(
    account: str = typer.Argument(..., help="the account"),
    db: str | None = DB,
) -> None:
    """Print an account's limits as JSON (null: unlimited).

    Example: distillguard accounts show acme
    """
    from distillguard.guard.keys import check_account

    limits = _store(db).account_limits(check_account(account))
    print(json.dumps({"account": account, **limits.public()}))
