"""The ``distillguard`` command line (typer + rich).

Domain errors (:class:`DistillguardError`) become a one-line message and exit code 2 here,
in one place; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from distillguard.errors import DistillguardError

app = typer.Typer(
    name="distillguard",
    help="LLM distillation through an API: serve and guard a teacher, distill it, investigate suspects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
console = Console()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="log debug messages")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    model: str = typer.Option("smollm2", "--model", "-m", help="model spec: smollm2 | tiny | HF id | DIR | FILE.gguf"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port (0 picks a free one)"),
    upstream: Optional[str] = typer.Option(None, help="proxy to this OpenAI-compatible URL instead of a local model"),
    upstream_api_key: Optional[str] = typer.Option(None, envvar="DISTILLGUARD_UPSTREAM_API_KEY",
                                                   help="bearer key for the upstream server"),
    upstream_timeout: float = typer.Option(120.0, help="seconds to wait for the upstream server"),
    served_model_name: Optional[str] = typer.Option(None, help="model id clients send (default: the spec)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    max_batch_rows: int = typer.Option(16, help="requests (choices) generated together at most"),
    default_max_tokens: int = typer.Option(1024, help="completion cap for requests that set none"),
) -> None:
    """Serve a teacher model through an OpenAI-compatible API.

    Examples:

      distillguard serve                          # the embedded SmolLM2-135M-Instruct on :8000

      distillguard serve --model tiny --port 0    # a tiny random model (tests)

      distillguard serve --upstream http://gpu-box:8000/v1 --upstream-api-key $KEY

    Then: curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}]}'
    """
    import uvicorn

    from distillguard.serve.app import create_app
    from distillguard.serve.config import ServeConfig

    config = ServeConfig(
        model=model, host=host, port=port, upstream=upstream, upstream_api_key=upstream_api_key,
        upstream_timeout_s=upstream_timeout, served_model_name=served_model_name, device=device,
        max_batch_rows=max_batch_rows, default_max_tokens=default_max_tokens,
    )
    if upstream:
        from distillguard.serve.upstream import UpstreamBackend

        backend = UpstreamBackend(config)
        err_console.print(f"[bold]distillguard[/] proxying to {backend.base_url}")
    else:
        from distillguard.models import load_model
        from distillguard.serve.local import LocalBackend

        with err_console.status(f"loading model {model!r} ..."):
            lm = load_model(model, device=device)
        backend = LocalBackend(lm, config)
        err_console.print(f"[bold]distillguard[/] serving {config.model_id!r} on {lm.device} "
                          f"(context {lm.context_length} tokens)")
    uvicorn.run(create_app(backend, config), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)


@app.command()
def version() -> None:
    """Print distillguard's version."""
    from distillguard import __version__

    console.print(__version__)


def main() -> None:
    try:
        app()
    except DistillguardError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except ValidationError as exc:  # a config value out of range, e.g. --port 70000
        err_console.print(f"[red]error:[/] {exc.errors(include_url=False)[0]['loc']}: {exc.errors()[0]['msg']}")
        sys.exit(2)


if __name__ == "__main__":
    main()
