"""``distillguard watermark``: test text for the per-account watermark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from distillguard.cli import DB_HELP, console
from distillguard.errors import ConfigError

watermark_app = typer.Typer(help="Detect the per-account watermark in text.", no_args_is_help=True)


def read_texts(file: str) -> list[str]:
    """A plain-text file is one text; a .jsonl file holds one per line ("text", or a traffic record's
    response text); - reads standard input."""
    raw = sys.stdin.read() if file == "-" else _read(Path(file))
    if not file.endswith(".jsonl"):
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ConfigError(f"{file}:{n}: not valid JSON") from None
        text = rec.get("text") if isinstance(rec, dict) else None
        if text is None and isinstance(rec, dict):
            text = (rec.get("response") or {}).get("text")
        if not isinstance(text, str):
            raise ConfigError(f"{file}:{n}: no 'text' field or response text in this record")
        texts.append(text)
    return texts


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    return path.read_text(encoding="utf-8")


@watermark_app.command("detect")
def detect(
    file: str = typer.Option(..., "--file", "-f", help="text file, .jsonl of texts or traffic records, or - for stdin"),
    account: Optional[str] = typer.Option(None, help="test this account's key"),
    all_accounts: bool = typer.Option(False, "--all-accounts", help="test every account in the ledger (Holm-corrected)"),
    accounts: Optional[str] = typer.Option(None, help="comma-separated accounts to test (instead of the ledger's)"),
    prompt: Optional[str] = typer.Option(None, help="file with the prompt(s): their n-grams are not scored"),
    model: str = typer.Option("smollm2", help="tokenizer of the teacher that generated the text"),
    secret: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_WATERMARK_SECRET", help="master secret (default: the server's file)"),
    scheme: str = typer.Option("keyed-hash", help="keyed-hash | lefthash-ref (as the server used)"),
    gamma: float = typer.Option(0.25, help="green fraction (as the server used)"),
    context_width: int = typer.Option(1, help="context width (as the server used)"),
    alpha: float = typer.Option(1e-3, help="significance level after Holm correction"),
    db: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Test text for the watermark: z-score and exact binomial p-value per key.

    Each (context, token) pair counts once across all texts; n-grams of --prompt are skipped.
    Exit code 0 either way; the verdict is in the output.

    Examples:

      distillguard watermark detect --file answer.txt --account acme

      distillguard ledger export --account acme -o a.jsonl && distillguard watermark detect -f a.jsonl --all-accounts --json
    """
    from distillguard.models import load_tokenizer
    from distillguard.watermark import WatermarkParams, account_key, trace
    from distillguard.watermark.detect import tokenize
    from distillguard.watermark.secret import load_secret

    if sum(bool(x) for x in (account, all_accounts, accounts)) != 1:
        raise ConfigError("pass exactly one of --account ID, --accounts A,B,... or --all-accounts")
    names = [account] if account else [a for a in (accounts or "").split(",") if a] if accounts else _ledger_accounts(db)
    if not names:
        raise ConfigError("no accounts to test: the ledger has none; pass --account or --accounts")
    params = WatermarkParams(scheme=scheme, gamma=gamma, context_width=context_width)
    master = load_secret(secret, create=False)
    keys = [account_key(master, name, params) for name in names]
    tok = load_tokenizer(model)
    texts = read_texts(file)
    prompts = read_texts(prompt) if prompt else []
    result = trace(keys, tokenize(tok, texts), prompt_seqs=tokenize(tok, prompts), vocab_size=len(tok), alpha=alpha)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table("account", "key id", "scored", "green", "z", "log10 p", "p (Holm)")
    for r, p in sorted(zip(result.results, result.adjusted_p), key=lambda x: x[0].log10_p):
        table.add_row(r.account or "-", r.key_id, str(r.scored), str(r.green), f"{r.z:.2f}", f"{r.log10_p:.1f}",
                      f"{p:.2e}", style="bold red" if p < alpha else None)
    console.print(table)
    console.print(f"traced to: {', '.join(result.accounts) or 'no account'} (alpha={alpha})")


def _ledger_accounts(db: str | None) -> list[str]:
    from sqlalchemy import select

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.schema import Account

    engine = make_engine(db)
    migrate(engine)
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(select(Account.id).order_by(Account.id))]
