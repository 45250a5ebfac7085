"""``distillguard watermark``: test text for the per-account watermark."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table

from distillguard.cli.common import DB_HELP, console, err_console
from distillguard.errors import ConfigError

watermark_app = typer.Typer(help="Detect the per-account watermark in text.", no_args_is_help=True)


@dataclass(frozen=True)
class Record:
    """One text to test, with what the teacher saw when it wrote it (when the file says)."""

    text: str
    messages: list[dict] | None = None  # the request's chat messages (traffic records)
    temperature: float | None = None  # the request's sampling temperature


# Rows of a ledger export whose text is not the model's own watermarked answer, by why: scored,
# they would be evidence of nothing (a canary is the gateway's fabricated sentence, keyed by the
# canary secret, never sampled under the account's watermark; a replay repeats an answer the
# export already holds, which would count its tokens twice).
NOT_THE_MODELS = {
    "canary": "a canary is the gateway's fabricated answer, not sampled under the watermark",
    "idempotent replay": "a replay repeats an answer already counted",
}


def not_the_models(response: dict) -> str | None:
    """Why a traffic record's answer is not the model's own (a key of ``NOT_THE_MODELS``), or
    None; from the ``policy_action`` (and ``canary``) that ``ledger export`` writes."""
    from distillguard.guard.ledger import is_canary_action

    action = response.get("policy_action")
    if response.get("canary") is True or is_canary_action(action):
        return "canary"
    if action == "idempotent_replay":
        return "idempotent replay"
    return None


def read_records(file: str, skipped: Counter | None = None) -> list[Record]:
    """A plain-text file is one text; a .jsonl file holds one per line ("text", a traffic record's
    response text with its request's messages and temperature, or a harvest's data.jsonl row:
    "response" with its "messages"), and a Parquet ledger export one per row; - reads standard
    input.

    A traffic record without an answer (a ``ledger export`` keeps refused, failed and aborted
    requests: 429, 403, 499 ...) is skipped and counted in ``skipped`` by its status, and one
    whose answer was not the model's (a canary, an idempotent replay: ``NOT_THE_MODELS``) by
    why, so the export is read as it comes; a record that is neither kind is an error naming
    its line."""
    from distillguard.detect.parquet import is_parquet

    parquet = file != "-" and not file.endswith(".jsonl") and is_parquet(file)
    if not file.endswith(".jsonl") and not parquet:
        return [Record(sys.stdin.read() if file == "-" else _read(Path(file)))]
    from distillguard.jsonl import iter_jsonl

    if not Path(file).is_file():
        raise ConfigError(f"no such file: {file}")
    if parquet:
        from distillguard.detect.parquet import read_traffic

        rows = enumerate(read_traffic(file), 1)
    else:
        rows = iter_jsonl(file)
    records = []
    for n, rec in rows:
        text = rec.get("text")
        if text is None and isinstance(rec.get("response"), str):
            # a harvest's data.jsonl (distill harvest): the answer as "response", its prompt as
            # "messages"; the teacher's temperature is not recorded there
            text = rec["response"]
            rec = {"request": {"messages": rec.get("messages")}}
            if not text:
                if skipped is not None:
                    skipped["empty answer"] += 1
                continue
        elif text is None and ("response" in rec or "request" in rec):
            response = rec.get("response") if isinstance(rec.get("response"), dict) else {}
            why = not_the_models(response)
            if why is not None:
                if skipped is not None:
                    skipped[why] += 1
                continue
            text = response.get("text")
            if not isinstance(text, str) or not text:
                if skipped is not None:
                    status = response.get("status", 200)
                    skipped["empty answer" if status == 200 else f"status {status}"] += 1
                continue
        if not isinstance(text, str):
            raise ConfigError(f"{file}:{n}: no 'text' field or response text in this record")
        request = rec.get("request") if isinstance(rec.get("request"), dict) else {}
        messages = request.get("messages")
        temperature = request.get("temperature")
        records.append(
            Record(
                text,
                messages if isinstance(messages, list) and messages else None,
                float(temperature) if isinstance(temperature, (int, float)) else None,
            )
        )
    return records


def read_texts(file: str) -> list[str]:
    return [r.text for r in read_records(file)]


def skipped_line(skipped: Counter, what: str = "rows without an answer") -> str:
    """'skipped 12 rows without an answer: 10 status 499, 2 status 429' ('' when none were);
    the rows whose answer was not the model's (``NOT_THE_MODELS``) get a sentence of their own:
    'skipped 4 rows whose answer was not the model's watermarked text: 4 canary'."""
    parts = []
    for kinds, what_ in (
        (Counter({k: v for k, v in skipped.items() if k not in NOT_THE_MODELS}), what),
        (
            Counter({k: v for k, v in skipped.items() if k in NOT_THE_MODELS}),
            "rows whose answer was not the model's watermarked text",
        ),
    ):
        if kinds:
            counts = ", ".join(f"{k} {s}" for s, k in kinds.most_common())
            why = "; ".join(NOT_THE_MODELS[s] for s in kinds if s in NOT_THE_MODELS)
            parts.append(f"skipped {sum(kinds.values())} {what_}: {counts}" + (why and f" ({why})"))
    return "; ".join(parts)


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    return path.read_text(encoding="utf-8")


@watermark_app.command("detect")
def detect(
    file: str = typer.Option(
        ...,
        "--file",
        "-f",
        help="text file, .jsonl of texts or traffic records, a Parquet ledger export, or - for stdin",
    ),
    account: str | None = typer.Option(None, help="test this account's key"),
    all_accounts: bool = typer.Option(
        False, "--all-accounts", help="test every account in the ledger (Holm-corrected)"
    ),
    accounts: str | None = typer.Option(
        None, help="comma-separated accounts to test (instead of the ledger's)"
    ),
    prompt: str | None = typer.Option(
        None, help="file with the prompt(s): their n-grams are not scored"
    ),
    model: str = typer.Option("smollm2", help="tokenizer of the teacher that generated the text"),
    teacher: str | None = typer.Option(
        None,
        help="entropy-aware detection: run this teacher (model spec, e.g. smollm2) over each answer and "
        "weight every token by the evidence it can carry (more power; the test stays exact)",
    ),
    secret: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_SECRET",
        help="master secret (default: the server's file)",
    ),
    scheme: str = typer.Option(
        "synthid",
        help="synthid | keyed-hash | lefthash-ref (as the server used; serve's default: synthid)",
    ),
    gamma: float | None = typer.Option(
        None, help="green fraction (as the server used; default: the scheme's)"
    ),
    delta: float | None = typer.Option(
        None, help="green bias (as the server used; --teacher only; default: the scheme's)"
    ),
    context_width: int | None = typer.Option(
        None, help="context width (as the server used; default: the scheme's)"
    ),
    min_entropy: float | None = typer.Option(
        None, help="the scheme's min_entropy (as the server used; default: the scheme's)"
    ),
    temperature: float = typer.Option(
        1.0, help="--teacher: sampling temperature of texts whose record gives none"
    ),
    alpha: float = typer.Option(1e-3, help="significance level after Holm correction"),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Test text for the watermark: z-score and exact binomial p-value per key.

    Each (context, token) pair counts once across all texts; n-grams of --prompt are skipped.
    With --teacher, the teacher's next-token distribution at every position (given the request's
    messages in traffic records, else --prompt, else an empty user turn) weights each pair by how
    much the watermark could tilt it; the weighted test is still exact. Exit code 0 either way;
    the verdict is in the output.

    Examples:

      distillguard watermark detect --file answer.txt --account acme

      distillguard ledger export --account acme -o a.jsonl && distillguard watermark detect -f a.jsonl --all-accounts --json

      distillguard watermark detect -f a.jsonl --account acme --teacher smollm2    # entropy-aware
    """
    from distillguard.models import load_tokenizer
    from distillguard.watermark import WatermarkParams, account_key, trace
    from distillguard.watermark.detect import tokenize
    from distillguard.watermark.secret import load_secret

    if sum(bool(x) for x in (account, all_accounts, accounts)) != 1:
        raise ConfigError("pass exactly one of --account ID, --accounts A,B,... or --all-accounts")
    names = (
        [account]
        if account
        else [a for a in (accounts or "").split(",") if a]
        if accounts
        else _ledger_accounts(db)
    )
    if not names:
        raise ConfigError("no accounts to test: the ledger has none; pass --account or --accounts")
    given = {
        "gamma": gamma,
        "delta": delta,
        "min_entropy": min_entropy,
        "context_width": context_width,
    }
    params = WatermarkParams(scheme=scheme, **{k: v for k, v in given.items() if v is not None})
    master = load_secret(secret, create=False)
    keys = [account_key(master, name, params) for name in names]
    skipped: Counter = Counter()
    records = read_records(file, skipped)
    if skipped:
        err_console.print(skipped_line(skipped), highlight=False)
    if not records:
        raise ConfigError(
            f"no answers to test in {file}" + (f" ({skipped_line(skipped)})" if skipped else "")
        )
    prompts = read_texts(prompt) if prompt else []
    weights = None
    if teacher:
        from distillguard.models import load_model

        with err_console.status(f"loading teacher {teacher!r} ..."):
            lm = load_model(teacher)
        tok, vocab = lm.tokenizer, lm.vocab_size
        answers = tokenize(tok, [r.text for r in records])
        weights = _teacher_weights(lm, params, records, prompts, answers, temperature)
    else:
        tok = load_tokenizer(model)
        vocab = len(tok)
        answers = tokenize(tok, [r.text for r in records])
        # the scheme's key-independent weights (SynthID: its layers by their mean lift)
        weights = params.impl.default_weights(params, answers)
    result = trace(
        keys,
        answers,
        prompt_seqs=tokenize(tok, prompts),
        vocab_size=vocab,
        alpha=alpha,
        weights=weights,
    )
    detector = params.impl.detector_names[bool(teacher)]
    from distillguard.watermark.power import DETECT_ADVICE, trace_power, unit_cap

    # every "not traced" with the test's power at this size (watermark/power.py)
    power = trace_power(
        result,
        texts=len(records),
        advice=DETECT_ADVICE[bool(teacher)],
        max_units=unit_cap(params),
    )
    if as_json:
        payload = {**result.to_dict(), "detector": detector, "skipped": dict(skipped)}
        print(json.dumps(power.annotate(payload)))
        return
    table = Table("account", "key id", "scored", "green", "z", "log10 p", "p (Holm)")
    for r, p in sorted(zip(result.results, result.adjusted_p), key=lambda x: x[0].log10_p):
        table.add_row(
            r.account or "-",
            r.key_id,
            str(r.scored),
            str(r.green),
            f"{r.z:.2f}",
            f"{r.log10_p:.1f}",
            f"{p:.2e}",
            style="bold red" if p < alpha else None,
        )
    console.print(table)
    console.print(
        f"traced to: {', '.join(result.accounts) or 'no account'} (alpha={alpha}, detector {detector}"
        f"{' with ' + teacher if teacher else ''})"
    )
    if power.closest is not None:
        console.print(
            f"not traced: {power.label} is nearest.\n" + power.per_key[power.closest].summary(),
            highlight=False,
        )


def _teacher_weights(
    lm,
    params,
    records: list[Record],
    prompts: list[str],
    answers: list[list[int]],
    temperature: float,
) -> list[list[int]]:
    """The entropy-aware weights of every answer token (``watermark.entropy``), the teacher
    seeing what it saw when it answered: the record's messages, else the matching --prompt
    (one per text, or one for all), else an empty user turn (weights then fit less well; the
    test stays exact, since they never depend on the key)."""
    from distillguard.cli.common import make_progress
    from distillguard.watermark.entropy import teacher_stats, teacher_weights

    if prompts and len(prompts) not in (1, len(records)):
        raise ConfigError(
            f"--teacher pairs prompts with texts: {len(prompts)} prompts for {len(records)} texts "
            "(give one prompt per text, or one for all)"
        )
    prompt_ids = []
    for i, r in enumerate(records):
        messages = r.messages or [
            {"role": "user", "content": prompts[i if len(prompts) > 1 else 0] if prompts else ""}
        ]
        prompt_ids.append(lm.chat_ids(messages))
    temps = [r.temperature if r.temperature is not None else temperature for r in records]
    weights: list[list[int] | None] = [None] * len(records)
    with make_progress(transient=True) as progress:
        task = progress.add_task("teacher pass", total=len(records))
        for t in sorted(set(temps)):  # one pass per sampling temperature (usually one)
            idx = [i for i, x in enumerate(temps) if x == t]
            for start in range(0, len(idx), 8):
                chunk = idx[start : start + 8]
                stats = teacher_stats(
                    lm.model,
                    [prompt_ids[i] for i in chunk],
                    [answers[i] for i in chunk],
                    temperature=t,
                    pad_id=lm.tokenizer.pad_token_id or 0,
                )
                for i, st in zip(chunk, stats):
                    weights[i] = teacher_weights(params, st, temperature=t)
                progress.advance(task, len(chunk))
    return weights


def _ledger_accounts(db: str | None) -> list[str]:
    from sqlalchemy import select

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.schema import Account

    engine = make_engine(db)
    migrate(engine)
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(select(Account.id).order_by(Account.id))]
