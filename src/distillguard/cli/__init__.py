"""The ``distillguard`` command line (typer + rich).

Domain errors (:class:`DistillguardError`) become a one-line message and exit code 2 here (1 for
:class:`IncompleteError`: the command did its work but a rerun must finish it), in one place;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

# re-exported: `from distillguard.cli import console` and the rest keep working
from distillguard.cli.common import (
    DB_HELP,
    configure_logging,
    console,
    err_console,
    verbose_option,
)
from distillguard.errors import DistillguardError

app = typer.Typer(
    name="distillguard",
    help="LLM distillation through an API: serve and guard a teacher, distill it, investigate suspects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: bool = verbose_option()) -> None:
    configure_logging(verbose)


@app.command()
def serve(  # noqa: PLR0913 - one option per setting, as users expect of a server command
    model: str = typer.Option(
        "smollm2", "--model", "-m", help="model spec: smollm2 | tiny | HF id | DIR | FILE.gguf"
    ),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port (0 picks a free one)"),
    upstream: str | None = typer.Option(
        None, help="proxy to this OpenAI-compatible URL instead of a local model"
    ),
    backend_name: str | None = typer.Option(
        None,
        "--backend",
        help="what answers: local (a model in this process) | upstream (--upstream URL) | a "
        "plugin's name (entry-point group distillguard.backends); default: upstream with "
        "--upstream, else local",
    ),
    upstream_api_key: str | None = typer.Option(
        None, envvar="DISTILLGUARD_UPSTREAM_API_KEY", help="bearer key for the upstream server"
    ),
    upstream_timeout: float = typer.Option(120.0, help="seconds to wait for the upstream server"),
    upstream_engine: str = typer.Option(
        "openai",
        help="what --upstream runs: openai (any OpenAI-compatible server; no watermark) | vllm "
        "(vLLM with distillguard's logits processor: per-account watermarks, docs/vllm.md)",
    ),
    served_model_name: str | None = typer.Option(
        None, help="model id clients send (default: the spec)"
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    max_batch_rows: int = typer.Option(16, help="requests (choices) generated together at most"),
    threads: int = typer.Option(
        0,
        help="torch CPU threads (0: one per core). On a machine busy with other "
        "work, 1 avoids stalls of threads waiting for each other",
    ),
    default_max_tokens: int = typer.Option(1024, help="completion cap for requests that set none"),
    max_prompt_tokens: int | None = typer.Option(
        None,
        envvar="DISTILLGUARD_MAX_PROMPT_TOKENS",
        help="longer prompts get 400 context_length_exceeded (default: the model's context length)",
    ),
    prefill_chunk: int = typer.Option(
        512,
        envvar="DISTILLGUARD_PREFILL_CHUNK",
        help="prompts longer than this many tokens are prefilled in chunks of it, between "
        "decoding steps of the running batch, so they cannot stall the other requests",
    ),
    no_guard: bool = typer.Option(
        False, "--no-guard", help="no API keys, limits, ledger or metrics"
    ),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    redis: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_REDIS",
        help="redis://HOST:PORT/0 to share rate limits between replicas",
    ),
    metrics_account_labels: bool = typer.Option(
        False, help="label Prometheus series by account (cardinality!)"
    ),
    no_watermark: bool = typer.Option(False, "--no-watermark", help="do not watermark responses"),
    watermark_scheme: str = typer.Option(
        "synthid",
        envvar="DISTILLGUARD_WATERMARK_SCHEME",
        help="synthid (SynthID-Text tournament) | keyed-hash | lefthash-ref (the reference scheme)",
    ),
    watermark_gamma: float | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_GAMMA",
        help="fraction of the vocabulary that is green (green-list "
        "schemes; default: WatermarkParams.gamma)",
    ),
    watermark_delta: float | None = typer.Option(
        None,
        envvar="DISTILLGUARD_WATERMARK_DELTA",
        help="logit bias added to green tokens (green-list schemes; "
        "default: WatermarkParams.delta)",
    ),
    policy: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_POLICY_FILE",
        help="YAML policy ladder: actions per verdict level (see docs)",
    ),
    detect: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_DETECT_CALIBRATION",
        help="calibration file (`distillguard detect --save-calibration`): "
        "score every request online and act on verdicts; 'external': replicas that share a "
        "ledger leave detection to one `distillguard monitor` process and run none here",
    ),
    extracting_after: int = typer.Option(
        100, help="flagged requests before a suspect account is 'extracting'"
    ),
    antidistill_data: str = typer.Option(
        "sharegpt",
        help="JSONL of {prompt, answer} whose loss antidistillation "
        "sampling keeps high for students (policy action 'antidistill'); "
        "default: 64 real ShareGPT answers",
    ),
    forwarded_allow_ips: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_FORWARDED_ALLOW_IPS",
        help="comma-separated proxies (IPs, networks, or *) whose X-Forwarded-For the ledger believes; "
        "default: none, the client address is the connection's",
    ),
    max_header_bytes: int = typer.Option(
        16 * 1024, help="request line + headers larger than this get 431"
    ),
    header_timeout: float = typer.Option(
        10.0, help="seconds a client has to send a request's headers"
    ),
    body_timeout: float = typer.Option(
        60.0, help="seconds a client has to send a request's body, after its headers"
    ),
    keep_alive_timeout: int = typer.Option(
        5, help="seconds an idle keep-alive connection stays open"
    ),
    limit_concurrency: int | None = typer.Option(
        None, help="open connections + requests beyond this get 503 (default: unbounded)"
    ),
    docs: bool = typer.Option(
        False, "--docs", help="serve /docs, /redoc and /openapi.json (to anyone)"
    ),
    metrics_auth: str = typer.Option(
        "admin",
        envvar="DISTILLGUARD_METRICS_AUTH",
        help="admin: /metrics needs the admin key (Prometheus: "
        "authorization.credentials) | none: open to anyone who can connect",
    ),
    ledger_content: str = typer.Option(
        "full",
        envvar="DISTILLGUARD_LEDGER_CONTENT",
        help="what the ledger keeps of prompts and answers: full | hashes "
        "(SHA-256 + length of each) | off (lengths only); see "
        "distillguard.guard.privacy for what each costs detection",
    ),
    redact: list[str] | None = typer.Option(
        None,
        "--redact",
        help="regex whose matches are stored as [REDACTED] (full mode; repeatable)",
    ),
) -> None:
    """Serve a teacher model through an OpenAI-compatible API.

    By default the guard is on: requests need an API key (`distillguard keys create`), limits
    apply, every request goes to the ledger, /metrics serves Prometheus and /admin the admin
    API (both authorised by DISTILLGUARD_ADMIN_KEY). X-Forwarded-For is ignored unless
    --forwarded-allow-ips names the proxy; /docs and /openapi.json are off unless --docs.

    Examples:

      distillguard serve                          # the embedded SmolLM2-135M-Instruct on :8000

      distillguard serve --db postgresql+psycopg://dg@db/dg --redis redis://cache:6379/0

      distillguard serve --model tiny --port 0    # a tiny random model (tests)

      distillguard serve --upstream http://gpu-box:8000/v1 --upstream-api-key $KEY

    Then: curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
    -H "Authorization: Bearer $KEY"
    -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}]}'
    """
    from distillguard.app import create_app
    from distillguard.serve.config import ServeConfig

    config = ServeConfig(
        model=model,
        host=host,
        port=port,
        upstream=upstream,
        upstream_api_key=upstream_api_key,
        upstream_timeout_s=upstream_timeout,
        upstream_engine=upstream_engine,
        served_model_name=served_model_name,
        device=device,
        max_batch_rows=max_batch_rows,
        default_max_tokens=default_max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        prefill_chunk=prefill_chunk,
        forwarded_allow_ips=tuple(
            p.strip() for p in (forwarded_allow_ips or "").split(",") if p.strip()
        ),
        max_header_bytes=max_header_bytes,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        keep_alive_timeout_s=keep_alive_timeout,
        limit_concurrency=limit_concurrency,
        docs=docs,
    )
    from distillguard.serve.backend import BACKENDS

    if threads < 0:
        raise typer.BadParameter(f"--threads {threads}: give 0 (one per core) or a positive count")
    if threads:
        import torch

        torch.set_num_threads(threads)
    name = backend_name or ("upstream" if upstream else "local")
    backend_class = BACKENDS.get(name)  # ConfigError naming the known backends
    with err_console.status(f"starting the {name} backend ({model!r}) ..."):
        backend = backend_class.from_config(config)
    err_console.print(f"[bold]distillguard[/] {backend.describe()}")
    guard = None
    if not no_guard:
        from distillguard.guard.gateway import Guard, GuardConfig

        monitor = None
        if detect == "external":
            err_console.print(
                "[bold]distillguard[/] online detection: external (`distillguard monitor` "
                "following this ledger records the verdicts)"
            )
            if ledger_content != "full":
                # it reads the ledger, not the request in memory as the in-process monitor does
                err_console.print(
                    f"[yellow]warning:[/] --ledger-content {ledger_content}: the external monitor "
                    "sees prompts as the ledger keeps them; calibrate it on traffic kept the same way"
                )
        elif detect:
            from distillguard.guard.online import OnlineDetection

            with err_console.status(f"loading detection calibration {detect} ..."):
                monitor = OnlineDetection.from_calibration(
                    detect, extracting_after=extracting_after
                )
        # γ and δ left unset take GuardConfig's defaults, which are the scheme's (WatermarkParams)
        scheme_params = {
            k: v
            for k, v in (("watermark_gamma", watermark_gamma), ("watermark_delta", watermark_delta))
            if v is not None
        }
        guard = Guard(
            GuardConfig(
                db=db,
                redis=redis,
                metrics_account_labels=metrics_account_labels,
                watermark=not no_watermark,
                watermark_scheme=watermark_scheme,
                policy_file=policy,
                metrics_auth=metrics_auth,
                ledger_content=ledger_content,
                redact=tuple(redact or ()),
                **scheme_params,
            ),
            monitor=monitor,
        )
        # Printed whatever the verbosity: every investigator command needs the ledger and the
        # secret, and a user who never set them does not know where they went. soft_wrap: a
        # path must stay one line when stderr is a file.
        err_console.print(
            f"[bold]distillguard[/] guard on: ledger {guard.engine.url.render_as_string()}"
            + (f", limits shared in {_masked(redis)}" if redis else ""),
            soft_wrap=True,
            highlight=False,
        )
        err_console.print(_secret_line(guard.config), soft_wrap=True, highlight=False)
        from distillguard.guard.db import check_reachable

        check_reachable(guard.engine)
        if "antidistill" in guard.policy.uses:
            # only a backend with the model's logits in this process can steer them
            enable = getattr(backend, "enable_antidistill", None)
            if enable is None:
                err_console.print(
                    "[yellow]warning:[/] the policy uses 'antidistill', which needs a local model: "
                    "it will be recorded as not applied"
                )
            else:
                from distillguard.serve.antidistill import build_direction, downstream_pairs

                with err_console.status("computing the antidistillation direction ..."):
                    direction = build_direction(backend.lm, downstream_pairs(antidistill_data))
                enable(direction)
                err_console.print(
                    f"[bold]distillguard[/] antidistillation sampling ready ({direction.tokens} "
                    f"answer tokens, downstream loss {direction.loss:.2f} nats/token)"
                )
    from distillguard.serve.server import run

    run(create_app(backend, config, guard), config)


def _masked(url: str) -> str:
    """``url`` with any password replaced by ``***`` (as SQLAlchemy prints the ledger's)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _secret_line(config) -> str:
    """Where the master watermark secret is: investigators need it for every test."""
    from distillguard.watermark.secret import default_secret_path

    use = "watermark detect, forensics and canaries need it"
    if config.watermark_secret is not None:
        return (
            "[bold]distillguard[/] watermark secret: from DISTILLGUARD_WATERMARK_SECRET "
            f"({use}: give them the same)"
        )
    return (
        f"[bold]distillguard[/] watermark secret: {default_secret_path()} (the default file, "
        f"shared by every --db; {use}: back it up)"
    )


@app.command()
def version() -> None:
    """Print distillguard's version."""
    from distillguard import __version__

    console.print(__version__)


def _register_groups() -> None:
    from distillguard.cli.arena import arena_app
    from distillguard.cli.demo import demo_command
    from distillguard.cli.detect import detect_command
    from distillguard.cli.distill import distill_app
    from distillguard.cli.forensics import forensics_app
    from distillguard.cli.forensics_report import report_command
    from distillguard.cli.keys import accounts_app, keys_app
    from distillguard.cli.ledger import ledger_app
    from distillguard.cli.monitor import monitor_command
    from distillguard.cli.watermark import watermark_app

    app.add_typer(keys_app, name="keys")
    app.add_typer(accounts_app, name="accounts")
    app.add_typer(ledger_app, name="ledger")
    app.add_typer(watermark_app, name="watermark")
    app.add_typer(distill_app, name="distill")
    app.add_typer(arena_app, name="arena")
    forensics_app.command("report")(report_command)
    app.add_typer(forensics_app, name="forensics")
    app.command("detect")(detect_command)
    app.command("demo")(demo_command)
    app.command("monitor")(monitor_command)


_register_groups()


def main() -> None:
    try:
        app()
    except DistillguardError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(getattr(exc, "exit_code", 2))
    except ValidationError as exc:  # a config value out of range, e.g. --port 70000
        err_console.print(
            f"[red]error:[/] {exc.errors(include_url=False)[0]['loc']}: {exc.errors()[0]['msg']}"
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
