"""A fixed text as an OpenAI chat completion, whole or as chunks.

For answers no backend generates (the policy's canaries): the same response and chunk shapes a
backend produces, so a client cannot tell them apart by form.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from distillguard.serve.backend import completion_id, now
from distillguard.serve.schemas import ChatCompletionRequest


def text_response(
    req: ChatCompletionRequest, text: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    """An OpenAI chat completion carrying ``text`` in every choice (no logprobs: none exist)."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(req.n)
    ]
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": now(),
        "model": req.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": req.n * completion_tokens,
            "total_tokens": prompt_tokens + req.n * completion_tokens,
        },
    }


async def text_chunks(
    req: ChatCompletionRequest, text: str, prompt_tokens: int, completion_tokens: int
) -> AsyncIterator[dict]:
    """The same answer as streamed chunks: role, content, finish, then usage."""
    cid, created = completion_id(), now()

    def chunk(choices, usage=None):
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": choices,
            **({"usage": usage} if usage is not None else {}),
        }

    for i in range(req.n):
        yield chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "finish_reason": "stop"}])
    total = prompt_tokens + req.n * completion_tokens
    yield chunk(
        [],
        {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": req.n * completion_tokens,
            "total_tokens": total,
        },
    )


__all__ = ["text_chunks", "text_response"]
