"""One exception tree for the whole package.

::

    DistillguardError                 anything distillguard raises on purpose
    ├── ConfigError                   a bad option or setting (names the value and the fix)
    │   └── DataFileError             an input file's line that cannot be read (names path:line)
    ├── ModelLoadError                a model spec that cannot be loaded (names the spec)
    ├── IncompleteError               a stage that ran but left work undone (a rerun resumes it); exit 1
    ├── ServerStartError              a server subprocess that exited or never became healthy; exit 1
    └── APIError                      maps to an HTTP response in OpenAI's error shape
        ├── InvalidRequestError       400 invalid_request_error
        │   └── ContextLengthExceeded 400 code=context_length_exceeded
        ├── NotFoundError             404 (e.g. model_not_found)
        ├── PayloadTooLarge           413
        ├── UnsupportedMediaType      415 a body that is not declared as JSON
        ├── RateLimited               429 type=requests|tokens, code=rate_limit_exceeded, Retry-After
        ├── ServiceUnavailable        503 a part the gateway needs (ledger, limiter) cannot serve now
        ├── UpstreamError             502 the upstream server failed or is unreachable
        └── UpstreamTimeout           504 the upstream server did not answer in time

Library code raises these; each boundary converts them once: the CLI prints a one-line
message and exits non-zero, the HTTP server answers ``{"error": {...}}``.
"""

from __future__ import annotations


class DistillguardError(Exception):
    """Base class of every error distillguard raises on purpose."""


class ConfigError(DistillguardError):
    """An option, setting or spec is invalid; the message names the value and the fix."""


class DataFileError(ConfigError):
    """A line of an input file (JSONL, a prompt list) that cannot be read: ``path:line: what``."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}")


class IncompleteError(DistillguardError):
    """A stage ran but left work undone (e.g. teacher requests that failed); rerunning resumes it."""

    exit_code = 1


class ServerStartError(DistillguardError):
    """A server started in a subprocess exited or did not become healthy; the message quotes its log."""

    exit_code = 1


class ModelLoadError(DistillguardError):
    """A model spec could not be loaded."""

    def __init__(self, spec: str, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(f"cannot load model {spec!r}: {reason}")


class APIError(DistillguardError):
    """An error that becomes an HTTP response in OpenAI's shape."""

    status_code = 500
    type = "api_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequestError):
    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    """415: a body whose ``Content-Type`` is not JSON (``text/plain``, a form, another charset)."""

    status_code = 415
    type = "invalid_request_error"


class RateLimited(APIError):
    """429: a rate limit or quota of an API key is exhausted; retry after ``retry_after`` s.

    OpenAI's shape: ``type`` says which resource ran out ("requests" or "tokens"), ``code`` is
    "rate_limit_exceeded". ``limit`` names the limit ("rpm", "tpm", "concurrency",
    "daily_tokens"); ``headers`` are the HTTP headers the boundary should send with it.
    """

    status_code = 429
    type = "requests"

    def __init__(self, message: str, *, limit: str, kind: str, retry_after: int):
        super().__init__(message, code="rate_limit_exceeded")
        self.limit = limit
        self.type = kind
        self.retry_after = max(1, int(retry_after))
        self.headers = {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(APIError):
    """503: the gateway cannot answer safely right now (e.g. the ledger cannot commit); retry later.

    Refusing at once beats accepting work whose record cannot be kept, or leaving clients hanging.
    """

    status_code = 503
    type = "server_error"

    def __init__(self, message: str, *, code: str, retry_after: int = 5):
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


class UpstreamError(APIError):
    status_code = 502
    type = "upstream_error"


class UpstreamTimeout(APIError):
    status_code = 504
    type = "upstream_error"
