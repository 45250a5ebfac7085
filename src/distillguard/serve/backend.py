"""The contract between the HTTP layer and whatever produces completions.

A backend turns a validated :class:`ChatCompletionRequest` into an OpenAI response object
(``complete``) or an async iterator of OpenAI chunk objects (``stream``). Both raise
:class:`~distillguard.errors.APIError` *before* producing anything when the request cannot
be served, so the HTTP layer can still answer with a 4xx/5xx status.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from distillguard.serve.schemas import ChatCompletionRequest


class Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def model_ids(self) -> list[str]: ...

    def budget(self, req: ChatCompletionRequest) -> int:
        """Upper bound of prompt + completion tokens, reserved against token limits."""
        ...

    def prompt_tokens(self, req: ChatCompletionRequest) -> int:
        """Tokens of the prompt (exact, or an upper bound where the tokenizer is remote)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of a completion text (exact, or an upper bound)."""
        ...

    supports_watermark: bool  # whether ``watermark=`` is applied (local) or ignored (upstream)
    # whether ``antidistill=λ`` is applied (a local model whose engine has a direction) or ignored
    supports_antidistill: bool

    async def complete(self, req: ChatCompletionRequest, *, watermark=None, antidistill: float = 0.0) -> dict: ...

    async def stream(self, req: ChatCompletionRequest, *, watermark=None,
                     antidistill: float = 0.0) -> AsyncIterator[dict]: ...


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
