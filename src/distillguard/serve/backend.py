"""The contract between the HTTP layer and whatever produces completions.

A backend turns a validated :class:`ChatCompletionRequest` into an OpenAI response object
(``complete``) or an async iterator of OpenAI chunk objects (``stream``). Both raise
:class:`~distillguard.errors.APIError` *before* producing anything when the request cannot
be served, so the HTTP layer can still answer with a 4xx/5xx status.

Both take a :class:`Usage` that the backend keeps current while it answers: a request cut
short (the client hung up mid-stream, or before a non-streaming answer was ready) is charged
and ledgered for what it consumed, not for nothing.

Backends are plugins: a class with ``from_config(config)`` named by an entry point of the
group ``distillguard.backends`` (``serve --backend NAME``). The built-ins, ``local`` and
``upstream``, are entry points in distillguard's own ``pyproject.toml``::

    [project.entry-points."distillguard.backends"]
    mybackend = "my_package.my_module:MyBackend"

A backend knows nothing of the guard: the request pipeline (``distillguard.pipeline``) hands it
a request already policed and admitted, and the watermark key to apply, if any.

What a backend can do to an answer is one query, :attr:`Backend.capabilities`: the
:class:`Capability` names of the countermeasures it applies. The pipeline asks it and drops (and
counts, in ``distillguard_countermeasures_unavailable``) what the backend cannot apply, so a new
countermeasure adds one name here, not a flag on every backend.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from distillguard.errors import ConfigError
from distillguard.plugins import Registry
from distillguard.serve.schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from distillguard.serve.config import ServeConfig

GROUP = "distillguard.backends"


class Capability(StrEnum):
    """A countermeasure a backend may be able to apply to the answers it generates."""

    WATERMARK = "watermark"  # the account's key (``watermark=``) embedded while sampling
    ANTIDISTILL = "antidistill"  # antidistillation sampling (``antidistill=λ``)


@dataclass
class Usage:
    """Tokens a request has used so far, updated by the backend as it answers.

    Streams count the tokens of the chunks handed to the HTTP layer (what the client was sent);
    a non-streaming answer counts the tokens generated, since they were paid for even if the
    client left before reading them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Backend(Protocol):
    @classmethod
    def from_config(cls, config: ServeConfig) -> Backend:
        """The backend ``serve`` runs for ``config`` (loading a model, opening a client, ...)."""
        ...

    def describe(self) -> str:
        """One line for the server's log: what it serves, from where."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def model_ids(self) -> list[str]: ...

    async def budget(self, req: ChatCompletionRequest) -> int:
        """Upper bound of prompt + completion tokens, reserved against token limits.

        Async because it may tokenize the prompt, which for a few megabytes takes seconds: that
        work runs off the event loop, and a local backend keeps the ids for the generation."""
        ...

    def prompt_tokens(self, req: ChatCompletionRequest) -> int:
        """Tokens of the prompt (exact, or an upper bound where the tokenizer is remote); cheap
        after :meth:`budget` has seen ``req``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of a completion text (exact, or an upper bound)."""
        ...

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The countermeasures this backend applies; the pipeline never asks it for another
        (``watermark=`` stays None, ``antidistill`` 0)."""
        ...

    async def complete(
        self,
        req: ChatCompletionRequest,
        *,
        watermark=None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> dict: ...

    async def stream(
        self,
        req: ChatCompletionRequest,
        *,
        watermark=None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> AsyncIterator[dict]: ...


def _check(name: str, obj: object) -> type[Backend]:
    if not isinstance(obj, type) or not callable(getattr(obj, "from_config", None)):
        raise ConfigError(
            f"backend {name!r} must be a class with a from_config(config) classmethod, got {obj!r}"
        )
    return obj


BACKENDS: Registry[type[Backend]] = Registry(GROUP, "backend", check=_check)

# The flags a backend declared before ``capabilities`` (one per countermeasure): read for one
# release, with a DeprecationWarning, so a third-party backend keeps its watermark meanwhile.
_LEGACY_FLAGS = {
    Capability.WATERMARK: "supports_watermark",
    Capability.ANTIDISTILL: "supports_antidistill",
}


def capabilities_of(backend: object, *, warn: bool = False) -> frozenset[Capability]:
    """``backend.capabilities``; for a backend written against the old ``supports_*`` flags, the
    capabilities those flags declare (with a DeprecationWarning when ``warn``: the pipeline warns
    once, when it is built, not on every request)."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, frozenset) and all(isinstance(c, Capability) for c in declared):
        return declared  # the common case, asked on every request: no copy
    if declared is not None:
        try:
            return frozenset(Capability(c) for c in declared)
        except ValueError as exc:
            raise ConfigError(
                f"backend {type(backend).__qualname__} declares an unknown capability ({exc}); "
                f"known: {', '.join(Capability)}"
            ) from None
    flags = {c: f for c, f in _LEGACY_FLAGS.items() if hasattr(backend, f)}
    if flags and warn:
        warnings.warn(
            f"backend {type(backend).__qualname__} declares {', '.join(sorted(flags.values()))}, "
            "which the next release no longer reads: declare "
            "capabilities = frozenset({Capability.WATERMARK, ...}) instead "
            "(distillguard.serve.backend.Capability; docs/extending.md)",
            DeprecationWarning,
            stacklevel=3,
        )
    return frozenset(c for c, f in flags.items() if getattr(backend, f))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
