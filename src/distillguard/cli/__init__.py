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
    configure_logging,
    console,
    err_console,
    verbose_option,
)
from distillguard.cli.options import option, seconds_or_off
from distillguard.errors import DistillguardError
from distillguard.guard.config import GuardConfig
from distillguard.serve.config import ServeConfig

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
    # Every default and help is ServeConfig's or GuardConfig's (cli/options.py): written once,
    # there. The envvars are the ones these options have always read.
    model: str = option(ServeConfig, "model", "--model", "-m"),
    host: str = option(ServeConfig, "host"),
    port: int = option(ServeConfig, "port"),
    upstream: str | None = option(ServeConfig, "upstream"),
    backend_name: str | None = option(ServeConfig, "backend", "--backend"),
    upstream_api_key: str | None = option(
        ServeConfig, "upstream_api_key", envvar="DISTILLGUARD_UPSTREAM_API_KEY"
    ),
    upstream_timeout: float = option(ServeConfig, "upstream_timeout_s", "--upstream-timeout"),
    upstream_engine: str = option(ServeConfig, "upstream_engine"),
    served_model_name: str | None = option(ServeConfig, "served_model_name"),
    device: str = option(ServeConfig, "device"),
    max_batch_rows: int = option(ServeConfig, "max_batch_rows"),
    threads: int = option(ServeConfig, "threads"),
    default_max_tokens: int = option(ServeConfig, "default_max_tokens"),
    max_prompt_tokens: int | None = option(
        ServeConfig, "max_prompt_tokens", envvar="DISTILLGUARD_MAX_PROMPT_TOKENS"
    ),
    prefill_chunk: int = option(ServeConfig, "prefill_chunk", envvar="DISTILLGUARD_PREFILL_CHUNK"),
    # whether there is a guard at all, so no setting of it
    no_guard: bool = typer.Option(
        False, "--no-guard", help="no API keys, limits, ledger or metrics"
    ),
    db: str | None = option(GuardConfig, "db", envvar="DISTILLGUARD_DB"),
    redis: str | None = option(GuardConfig, "redis", envvar="DISTILLGUARD_REDIS"),
    metrics_account_labels: bool = option(GuardConfig, "metrics_account_labels"),
    watermark: bool = option(GuardConfig, "watermark", "--watermark/--no-watermark"),
    watermark_scheme: str = option(
        GuardConfig, "watermark_scheme", envvar="DISTILLGUARD_WATERMARK_SCHEME"
    ),
    watermark_gamma: float | None = option(
        GuardConfig, "watermark_gamma", envvar="DISTILLGUARD_WATERMARK_GAMMA"
    ),
    watermark_delta: float = option(
        GuardConfig, "watermark_delta", envvar="DISTILLGUARD_WATERMARK_DELTA"
    ),
    policy: str | None = option(
        GuardConfig, "policy_file", "--policy", envvar="DISTILLGUARD_POLICY_FILE"
    ),
    detect: str | None = option(
        GuardConfig, "detect_calibration", "--detect", envvar="DISTILLGUARD_DETECT_CALIBRATION"
    ),
    extracting_after: int = option(GuardConfig, "extracting_after"),
    extracting_after_s: float | None = option(
        GuardConfig, "extracting_after_s", metavar="SECONDS|off", parser=seconds_or_off
    ),
    detect_state: str | None = option(GuardConfig, "detect_state"),
    detect_lease_ttl: float = option(GuardConfig, "detect_lease_ttl_s", "--detect-lease-ttl"),
    detect_poll: float = option(GuardConfig, "detect_poll_s", "--detect-poll"),
    antidistill_data: str = option(GuardConfig, "antidistill_data"),
    # comma-separated on the command line, a tuple in the config
    forwarded_allow_ips: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_FORWARDED_ALLOW_IPS",
        help="comma-separated: "
        + (ServeConfig.model_fields["forwarded_allow_ips"].description or ""),
    ),
    max_header_bytes: int = option(ServeConfig, "max_header_bytes"),
    header_timeout: float = option(ServeConfig, "header_timeout_s", "--header-timeout"),
    body_timeout: float = option(ServeConfig, "body_timeout_s", "--body-timeout"),
    keep_alive_timeout: int = option(ServeConfig, "keep_alive_timeout_s", "--keep-alive-timeout"),
    limit_concurrency: int | None = option(ServeConfig, "limit_concurrency"),
    docs: bool = option(ServeConfig, "docs", "--docs"),
    metrics_auth: str = option(GuardConfig, "metrics_auth", envvar="DISTILLGUARD_METRICS_AUTH"),
    ledger_content: str = option(
        GuardConfig, "ledger_content", envvar="DISTILLGUARD_LEDGER_CONTENT"
    ),
    redact: list[str] = option(GuardConfig, "redact", "--redact"),
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

    if threads < 0:
        raise typer.BadParameter(f"--threads {threads}: give 0 (one per core) or a positive count")
    config = ServeConfig(
        model=model,
        backend=backend_name,
        threads=threads,
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
        from distillguard.guard.gateway import Guard

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
                    detect, extracting_after=extracting_after, extracting_after_s=extracting_after_s
                )
            err_console.print(
                f"[bold]distillguard[/] online detection: {detect}; {monitor.describe()}",
                soft_wrap=True,
                highlight=False,
            )
        guard = Guard(
            GuardConfig(
                db=db,
                redis=redis,
                metrics_account_labels=metrics_account_labels,
                watermark=watermark,
                watermark_scheme=watermark_scheme,
                watermark_gamma=watermark_gamma,
                watermark_delta=watermark_delta,
                policy_file=policy,
                detect_calibration=detect,
                extracting_after=extracting_after,
                extracting_after_s=extracting_after_s,
                detect_state=detect_state,
                detect_lease_ttl_s=detect_lease_ttl,
                detect_poll_s=detect_poll,
                antidistill_data=antidistill_data,
                metrics_auth=metrics_auth,
                ledger_content=ledger_content,
                redact=tuple(redact),
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
