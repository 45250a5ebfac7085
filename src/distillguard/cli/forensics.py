"""``distillguard forensics``: tests of a suspect model (was it trained on our outputs?)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from distillguard.cli.common import DB_HELP, console, err_console
from distillguard.errors import ConfigError

forensics_app = typer.Typer(
    help="Investigate a suspect model: radioactivity of the per-account watermark.",
    no_args_is_help=True,
)


def read_prompts(source: str, limit: int | None) -> list[str]:
    """A .txt file holds one prompt per line; anything else goes through the harvest's prompt
    loader (``sharegpt``, .jsonl/.csv/.parquet, a datasets directory). Single-turn only."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise ConfigError(f"no such prompt file: {source}")
        from distillguard.jsonl import read_text_lines

        prompts = read_text_lines(path)
    else:
        from distillguard.distill.prompts import load_prompts

        prompts = [p.messages[-1][1] for p in load_prompts(source, limit=limit, max_chars=2000)]
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise ConfigError(f"no prompts in {source}")
    return prompts


def master_secret(secret: str | None, secret_file: Path | None) -> bytes:
    """The master secret from --secret (or its env var) or --secret-file, never both."""
    from distillguard.watermark.secret import load_secret

    if secret and secret_file:
        raise ConfigError(
            "pass --secret (or DISTILLGUARD_WATERMARK_SECRET) or --secret-file, not both"
        )
    if secret_file is not None and not secret_file.is_file():
        raise ConfigError(f"no such secret file: {secret_file}")
    return load_secret(secret, secret_file, create=False)


@forensics_app.command("radioactivity")
def radioactivity(  # noqa: PLR0913 - one option per setting of the test
    suspect: str = typer.Option(
        ...,
        "--suspect",
        "-s",
        help="the suspect: an OpenAI-compatible URL (closed mode) or, open mode, any model spec: "
        "DIR, ORG/NAME, PATH.gguf, smollm2, tiny, prune:K[:how][:mlpW] (cut from --tokenizer)",
    ),
    secret: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_SECRET",
        help="master watermark secret (default: the server's secret file)",
    ),
    secret_file: Path | None = typer.Option(
        None, help="file holding the master secret (as the server keeps it)"
    ),
    accounts: str = typer.Option(
        "all", help="'all' (every account in the ledger) or comma-separated accounts"
    ),
    mode: str | None = typer.Option(
        None, help="open (weights) | closed (API); default: closed for a URL, else open"
    ),
    prompts: str = typer.Option(
        "sharegpt",
        help="prompts the suspect answers: FILE.txt (one per line), "
        ".jsonl/.csv/.parquet, a datasets dir, or sharegpt",
    ),
    limit: int = typer.Option(100, help="number of prompts used"),
    skip: int = typer.Option(
        0, help="skip this many prompts first (e.g. those the suspect may have trained on)"
    ),
    tokenizer: str = typer.Option(
        "smollm2",
        "--tokenizer",
        help="model spec of the teacher whose vocabulary the watermark uses",
    ),
    scheme: str = typer.Option(
        "synthid",
        help="synthid | keyed-hash | lefthash-ref (as the server used; serve's default: synthid)",
    ),
    gamma: float | None = typer.Option(
        None, help="green fraction (as the server used; default: the scheme's)"
    ),
    context_width: int | None = typer.Option(
        None, help="context width (as the server used; default: the scheme's)"
    ),
    max_tokens: int = typer.Option(64, help="tokens per answer of the suspect"),
    temperature: float = typer.Option(0.7, help="sampling temperature of the suspect's answers"),
    api_key: str | None = typer.Option(
        None, envvar="DISTILLGUARD_SUSPECT_API_KEY", help="bearer key for the suspect's API"
    ),
    served_model: str | None = typer.Option(
        None, help="model name at the suspect's API (default: the first listed)"
    ),
    null_keys: int = typer.Option(
        200, help="open mode: wrong keys for the empirical null (0: none)"
    ),
    alpha: float = typer.Option(1e-3, help="significance level after Holm correction"),
    seed: int = typer.Option(0, help="sampling seed"),
    device: str = typer.Option("auto", help="open mode: auto | cpu | cuda | cuda:N"),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    filter_data: Path | None = typer.Option(
        None,
        "--filter-data",
        help="JSONL of the suspected training data, or a ledger export (each account by its own "
        "answers): score only the suspect's units whose watermark context occurs in it (Sander "
        "et al.'s filter; green-list schemes only)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Test whether a suspect model learned the per-account watermark, and trace it to accounts.

    closed (a URL): the suspect's API answers the prompts; its text is tested per key.

    open (weights): the suspect answers the prompts itself; its probability mass on green tokens
    (synthid: its expected g-value over the tournament's layers) is tested per key.

    Holm over the keys names the accounts it traces to. Exit code 0 either way; the verdict is in the output.

    Examples:

      distillguard forensics radioactivity --suspect http://suspect:8000/v1 --api-key $KEY --accounts all

      distillguard forensics radioactivity --suspect ./student --mode open --accounts acme,globex --json

      distillguard forensics radioactivity --suspect ./student --mode open --scheme synthid --accounts all

      DISTILLGUARD_WATERMARK_SECRET=... distillguard forensics radioactivity -s ./student --prompts held_out.txt
    """
    from distillguard.cli.watermark import _ledger_accounts
    from distillguard.forensics import closed_radioactivity, open_radioactivity
    from distillguard.models import load_model, load_tokenizer
    from distillguard.watermark import WatermarkParams, account_key

    is_url = suspect.startswith(("http://", "https://"))
    mode = mode or ("closed" if is_url else "open")
    if mode not in ("open", "closed"):
        raise ConfigError(f"--mode {mode!r}: use open (suspect weights) or closed (suspect API)")
    if mode == "closed" and not is_url:
        raise ConfigError(
            f"--mode closed needs the suspect's API URL (http://...), got {suspect!r}"
        )
    if mode == "open" and is_url:
        raise ConfigError(
            "--mode open needs the suspect's weights (a model spec or directory), not a URL"
        )
    names = (
        _ledger_accounts(db)
        if accounts == "all"
        else [a.strip() for a in accounts.split(",") if a.strip()]
    )
    if not names:
        raise ConfigError("no accounts to test: the ledger has none; pass --accounts A,B,...")
    master = master_secret(secret, secret_file)
    params = WatermarkParams(scheme=scheme, gamma=gamma, context_width=context_width)
    keys = [account_key(master, name, params) for name in names]
    texts = read_prompts(prompts, limit + skip)[skip:]
    filters = _training_filters(filter_data, names, load_tokenizer(tokenizer), params, mode)
    if mode == "closed":
        tok = load_tokenizer(tokenizer)
        with err_console.status(f"asking {suspect} {len(texts)} prompts ..."):
            result = closed_radioactivity(
                suspect,
                keys,
                texts,
                tok,
                model=served_model,
                api_key=api_key,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                alpha=alpha,
                filters=filters,
            )
    else:
        with err_console.status(f"loading {suspect!r} ..."):
            # any model spec: a directory, an HF id, tiny, or prune:K cut from --tokenizer's teacher
            lm = load_model(suspect, device=device, teacher=tokenizer)
        teacher_vocab = len(load_tokenizer(tokenizer))
        if len(lm.tokenizer) != teacher_vocab:
            raise ConfigError(
                f"the suspect's tokenizer has {len(lm.tokenizer)} tokens, the teacher's ({tokenizer}) "
                f"{teacher_vocab}: open mode needs a suspect with the teacher's tokenizer (use closed mode)"
            )
        result = open_radioactivity(
            lm,
            keys,
            texts,
            max_new_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            null_keys=null_keys,
            alpha=alpha,
            filter_data=filters,
        )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(
        "account",
        "key id",
        "green",
        "z",
        "log10 p",
        "p (Holm)",
        *(["empirical p", "top-1 log10 p"] if mode == "open" else []),
    )
    for k in sorted(result.keys, key=lambda k: k.log10_p):
        extra = (
            [
                f"{k.extra['empirical_p']:.3g}" if "empirical_p" in k.extra else "-",
                f"{k.extra['top1_log10_p']:.1f}",
            ]
            if mode == "open"
            else []
        )
        table.add_row(
            k.account or "-",
            k.key_id,
            f"{k.green_fraction:.3f}",
            f"{k.z:.2f}",
            f"{k.log10_p:.1f}",
            f"{k.p_holm:.2e}",
            *extra,
            style="bold red" if k.p_holm < alpha else None,
        )
    console.print(table)
    unit = "distinct contexts" if mode == "open" else "distinct (context, token) pairs"
    console.print(
        f"{mode} mode ({result.test}), {result.texts} answers, {result.scored} {unit} scored; "
        f"gamma={result.gamma}"
        + (
            f"; wrong keys: green {result.null['green_fraction_mean']:.3f} "
            f"± {result.null['green_fraction_sd']:.3f}"
            if result.null
            else ""
        )
    )
    if result.filter is not None:
        console.print(_filter_line(result.filter), highlight=False)
    console.print(
        f"traced to: {', '.join(result.traced) or 'no account'} (alpha={alpha}, Holm over {len(keys)} keys)"
    )
    _print_power(result.to_dict()["power"])


def _training_filters(path: Path | None, names, tokenizer, params, mode: str):
    """--filter-data as the tests take it: closed mode one filter per account when the rows name
    accounts (each account's own answers), else one for all; open mode one for all (the union:
    another account's text adds contexts that do not depend on this key)."""
    if path is None:
        return None
    from distillguard.forensics.training_filter import (
        filters_by_account,
        read_filter_data,
        training_filter,
    )

    by_account, sha = read_filter_data(path)
    width = params.context_width
    if mode == "open":
        texts = [t for rows in by_account.values() for t in rows]
        return training_filter(texts, tokenizer, width, source=str(path), sha256=sha)
    return filters_by_account(by_account, names, tokenizer, width, source=str(path), sha256=sha)


def _filter_line(record: dict) -> str:
    """What the training-data filter did (the power statement below is of the filtered test)."""
    if "accounts" in record:  # closed mode: per account
        kept = {a: r["kept_units"] for a, r in record["accounts"].items() if r is not None}
        what = (
            f"{record['units_unfiltered']} units before; kept "
            + ", ".join(f"{a}: {n}" for a, n in kept.items())
            if kept
            else "no tested account has answers in it: every test ran unfiltered"
        )
    else:
        what = f"{record['kept_units']} contexts kept of the data's {record['contexts']}"
    return f"training-data filter (sha256 {str(record.get('sha256'))[:12]}...): {what}"


def _print_power(power: dict | None) -> None:
    """Next to a "not traced": the test's power at this size, for the untraced account nearest
    to being traced (forensics/canary_power.py, watermark/power.py)."""
    from distillguard.watermark.power import Power

    if power is None:
        return
    account = power.pop("account")
    console.print(
        f"not traced: {account} is nearest.\n" + Power.from_dict(power).summary(),
        highlight=False,
    )


@forensics_app.command("canaries")
def canaries(
    suspect: str = typer.Option(
        ...,
        "--suspect",
        "-s",
        help="the suspect's weights: DIR, ORG/NAME, PATH.gguf, smollm2, tiny, or prune:K[:how][:mlpW]",
    ),
    secret: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_SECRET",
        help="master secret (default: the server's secret file)",
    ),
    secret_file: Path | None = typer.Option(
        None, help="file holding the master secret (as the server keeps it)"
    ),
    accounts: str = typer.Option(
        "all", help="'all' (every account served canaries) or comma-separated accounts"
    ),
    decoys: int = typer.Option(
        49, help="never-served endings each canary is ranked against (p resolution 1/(decoys+1))"
    ),
    limit: int = typer.Option(
        200, help="at most this many served canaries (the most recent are kept)"
    ),
    alpha: float = typer.Option(1e-3, help="significance level after Holm correction"),
    seed: int = typer.Option(0, help="seed of the random tie-breaking"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    teacher: str = typer.Option(
        "smollm2", help="model spec of the teacher a --suspect prune:K... is cut from"
    ),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Test whether a suspect model learned the canary answers served to suspected extractors.

    Each canary recorded in the ledger (policy action `canary`) is scored by the suspect with its
    true ending and with never-served decoy endings; the rank of the true one is an exact
    p-value, combined per account (Fisher) and corrected over accounts (Holm).

    Examples:

      distillguard forensics canaries --suspect ./student --db ledger.db

      distillguard forensics canaries -s ./student --accounts acme,globex --decoys 99 --json
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from distillguard.cli.common import make_progress
    from distillguard.forensics.canaries import canary_test, served_canaries
    from distillguard.guard.db import make_engine, migrate
    from distillguard.models import load_model

    master = master_secret(secret, secret_file)
    names = None if accounts == "all" else [a.strip() for a in accounts.split(",") if a.strip()]
    engine = make_engine(db)
    try:
        migrate(engine)  # an older ledger gets the current schema; a new one is empty
        served = served_canaries(engine, accounts=names)[-limit:]
    finally:
        engine.dispose()
    if not served:
        raise ConfigError(
            "the ledger holds no canary answers"
            + (f" for {', '.join(names)}" if names else "")
            + ": the gateway serves them to accounts at 'extracting' (the default ladder; online "
            "detection with `serve --detect CAL.npz`, or an admin's verdict) and to any level "
            "whose `serve --policy` ladder has the action 'canary'"
        )
    with err_console.status(f"loading {suspect!r} ..."):
        lm = load_model(suspect, device=device, teacher=teacher)
    with make_progress(
        TextColumn("scoring canaries"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("canaries", total=len(served))
        result = canary_test(
            lm,
            master,
            served,
            decoys=decoys,
            alpha=alpha,
            seed=seed,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table("account", "canaries", "ranked first", "mean rank", "log10 p", "p (Holm)")
    for a in result.accounts:
        table.add_row(
            a.account,
            str(a.canaries),
            str(a.top1),
            f"{a.mean_rank:.1f} / {decoys + 1}",
            f"{a.log10_p:.1f}",
            f"{a.p_holm:.2e}",
            style="bold red" if a.p_holm < alpha else None,
        )
    console.print(table)
    console.print(
        f"null: mean rank {(decoys + 2) / 2:.1f}; traced to: {', '.join(result.traced) or 'no account'} "
        f"(alpha={alpha}, Holm over {len(result.accounts)} accounts)"
    )
    if result.skipped_too_long:
        console.print(
            f"left out: {result.skipped_too_long} of {len(served)} canaries, whose prompt does not "
            f"fit the suspect's context ({lm.context_length} tokens)"
        )
    _print_power(result.to_dict()["power"])
