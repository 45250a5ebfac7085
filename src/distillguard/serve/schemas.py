"""Request schema of ``POST /v1/chat/completions`` and its validation into OpenAI-shaped errors.

Strict on purpose: unknown fields, wrong JSON types (``"5"`` for an int, ``1`` for a bool) and
out-of-range values are rejected with the offending ``param`` named, as OpenAI does.
"""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillguard.errors import InvalidRequestError, UnsupportedMediaType

MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_STOP = 4
# A token id as OpenAI writes it: ASCII digits only. ``str.isdigit`` also passes "²" and "١٢",
# which ``int()`` then refuses (a 500), and an unbounded run of digits overflows the engine.
TOKEN_ID = re.compile(r"[0-9]{1,10}")

# OpenAI parameters this server understands but does not implement: named in the error.
UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "response_format",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "service_tier",
        "store",
        "metadata",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # OpenAI's seed is a 64-bit integer; a bigger one is a client bug, not a seed
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def check(self) -> None:
        """Cross-field rules pydantic's per-field validation cannot express."""
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs=true", param="top_logprobs", code="invalid_value"
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream=true",
                param="stream_options",
                code="invalid_value",
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequestError(
                "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                param="max_tokens",
                code="invalid_value",
            )
        for key in self.logit_bias or {}:
            if not TOKEN_ID.fullmatch(key):
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids written as 1-10 ASCII digits, got {_short(key)}",
                    param="logit_bias",
                    code="invalid_value",
                )
        if isinstance(self.stop, list) and any(not s for s in self.stop):
            raise InvalidRequestError(
                "stop sequences must be non-empty", param="stop", code="invalid_value"
            )


def check_content_type(value: str | None) -> None:
    """Refuse a body not declared as JSON in UTF-8: 415 ``unsupported_content_type`` (OpenAI's
    code for it).

    ``application/json`` in any case, with no charset or ``charset=utf-8``, is JSON (RFC 8259
    allows only UTF-8 between systems); so is a body with no ``Content-Type`` at all (RFC 9110
    §8.3 lets the recipient look at the data; FastAPI does the same). Anything else declared,
    ``text/plain``, a form (what ``curl -d`` sends without ``-H``), ``charset=utf-16``, was
    parsed as JSON all the same before, and stored as such: a body means what its sender says.
    """
    if value is None or value.lower() == "application/json":  # the openai client's, first
        return
    # the standard library's MIME header parser: parameters, quoting and case as RFC 2045's
    header = Message()
    header["content-type"] = value
    charset = header.get_param("charset")
    if header.get_content_type() == "application/json" and (
        charset is None or (isinstance(charset, str) and charset.lower() == "utf-8")
    ):
        return
    raise UnsupportedMediaType(
        f"Unsupported content type: {_short(value)}. This endpoint accepts only "
        "'application/json' (UTF-8): send the header 'Content-Type: application/json' "
        "(curl: -H 'Content-Type: application/json', or --json instead of -d)",
        param="Content-Type",
        code="unsupported_content_type",
    )


_Checked = TypeVar("_Checked", bound=BaseModel)


def parse_request(model: type[_Checked], body: bytes) -> _Checked:
    """Validate a raw request body as ``model`` (a request schema with a ``check()``); every
    failure becomes an :class:`InvalidRequestError`."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_to_api_error(exc, body) from None
    req.check()
    return req


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a raw chat request body; every failure becomes an :class:`InvalidRequestError`."""
    return parse_request(ChatCompletionRequest, body)


_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as its JSON escape: printable, and encodable as UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def find_lone_surrogate(body: bytes) -> tuple[str, str] | None:
    """(parameter path, the surrogate escaped) of the first string or key in ``body`` holding a
    lone UTF-16 surrogate (a ``"\\ud800"`` escape with no pair), or None.

    Such a string is valid JSON but not Unicode: no database or UTF-8 encoder stores it. Only
    Python's own decoder accepts it, so it is used here, on the error path only, to name the field.
    """
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, object]] = [("", value)]  # iterative: the body may nest deeply
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return path, escape_surrogates(found.group())
        elif isinstance(item, dict):
            named = [
                (f"{path}.{escape_surrogates(k)}" if path else escape_surrogates(k), k, v)
                for k, v in item.items()
            ]
            for sub, k, _ in named:
                found = _SURROGATE.search(k)
                if found:
                    return sub, escape_surrogates(found.group())
            stack.extend((sub, v) for sub, _, v in reversed(named))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def _param(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in (
            "str",
            "list[TextPart]",
            "list[str]",
            "int",
            "float",
            "bool",
            "StreamOptions",
        ):
            continue  # pydantic's union-branch markers, not part of the parameter's path
        elif isinstance(item, str) and (
            item.startswith(("function-", "constrained-")) or "[" in item
        ):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def validation_to_api_error(exc: ValidationError, body: bytes | None = None) -> InvalidRequestError:
    errors = exc.errors(include_url=False)
    # A union reports one error per branch. The informative one is the branch whose type
    # matched but whose value did not (a 5-item ``stop`` list is "too long", not "not a
    # string"), and among those the deepest: prefer value errors, then longer locations.
    err = sorted(errors, key=lambda e: (e["type"].endswith("_type"), -len(e.get("loc", ()))))[0]
    kind = err["type"]
    loc = tuple(err.get("loc", ()))
    param = _param(loc)
    if kind == "json_invalid":
        found = find_lone_surrogate(body) if body is not None and b"\\u" in body else None
        if found is not None:
            where, char = found
            return InvalidRequestError(
                f"Invalid value for '{where}': it holds the lone surrogate {char}, which is not Unicode text; "
                "write a character outside the Basic Multilingual Plane as a surrogate pair (e.g. \\ud83d\\ude00) "
                "or as UTF-8",
                param=where,
                code="invalid_unicode",
            )
        return InvalidRequestError(
            f"the request body is not valid JSON: {err.get('msg', '')}",
            param=None,
            code="invalid_json",
        )
    if kind in ("model_type", "model_attributes_type") and not loc:
        return InvalidRequestError(
            "the request body must be a JSON object", param=None, code="invalid_json"
        )
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        if len(loc) == 1 and name in UNSUPPORTED:
            return InvalidRequestError(
                f"parameter {name!r} is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )
        return InvalidRequestError(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: {param!r}", param=param, code="missing_required_parameter"
        )
    if kind in ("too_short",) and param == "messages":
        return InvalidRequestError(
            "messages must contain at least one message", param=param, code="invalid_value"
        )
    if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid", "enum"):
        return InvalidRequestError(
            f"Invalid type for {param!r}: {err['msg']} (got {_short(err.get('input'))})",
            param=param,
            code="invalid_type",
        )
    return InvalidRequestError(
        f"Invalid value for {param!r}: {err['msg']} (got {_short(err.get('input'))})",
        param=param,
        code="invalid_value",
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
