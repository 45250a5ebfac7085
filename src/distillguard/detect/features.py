"""Per-request features of a traffic record (DESIGN.md "Traffic log"), the detectors' only input.

A record is ``{"ts", "account", "request": {...}, "ip"?, "response"?: {"usage"}, "label"?}``;
``label`` is ground truth for evaluation and is never read here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from distillguard.errors import ConfigError

# Phrases that ask the model to show its chain of thought (reasoning-trace harvesting).
COT_MARKERS = re.compile(
    r"step[- ]by[- ]step|show (?:your|all|the) (?:work|reasoning|steps)|explain your reasoning|"
    r"think (?:carefully|aloud|out loud|through)|reason(?:ing)? (?:step|carefully|through)|chain[- ]of[- ]thought|"
    r"<think>|let'?s think|walk me through your (?:thinking|reasoning)",
    re.IGNORECASE,
)
# The same pattern matched case-sensitively against lowered text: for ASCII text this is exactly
# IGNORECASE (whose Unicode folding also lets e.g. "ſ" match "s") and ~4x cheaper per prompt.
_COT_LOWER = re.compile(COT_MARKERS.pattern)


def _cot(text: str) -> bool:
    if text.isascii():
        return _COT_LOWER.search(text.lower()) is not None
    return COT_MARKERS.search(text) is not None


_WORD = re.compile(r"[a-z0-9']+")
_DIGITS = re.compile(r"\d+")
LARGE_MAX_TOKENS = 2048  # a completion budget few chat users set; harvesters ask for long answers


def _text(content) -> str:
    """Message content as text: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest()


def _stored_digest(content) -> str | None:
    """For a content a ledger kept without its text (``--ledger-content hashes``: ``{"sha256",
    "chars"}``; ``off``: ``{"chars"}``; guard/privacy.py), an id equal for equal texts (from the
    SHA-256), or "" when nothing identifies the text; None for a content with text."""
    if isinstance(content, dict) and "chars" in content:
        sha = content.get("sha256")
        return sha[:16] if isinstance(sha, str) else ""
    return None


# Function words kept in a template signature; every run of other words becomes one slot.
_FUNCTION = frozenset(
    """a an the of to in on for with about and or but as at by from into than then that this these
those is are was were be been it its i me my you your we our they their he she his her what which who whom whose
how why when where can could would should will shall do does did not no in exactly each every some any all
please give list write explain describe create generate compare summarize make tell show""".split()
)


def without_text(record: dict) -> bool:
    """True when a traffic record's prompt was stored without its text (``--ledger-content
    hashes`` or ``off``), so the text detectors can say what they could not see."""
    messages = (record.get("request") or {}).get("messages")
    users = (
        [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if isinstance(messages, list)
        else []
    )
    return bool(users) and _stored_digest(users[-1].get("content")) is not None


def template_signature(prompt: str) -> str | None:
    """The skeleton of a prompt: its first word and function words, other words as slots.

    "Write a poem about the ocean." and "Write a haiku about the moon." share
    ``write a _ about the _``: prompts filled from one template share a signature. Digits fold
    into slots. Prompts under 4 words or with fewer than 2 function words get none; long
    prompts use their first 16 words.
    """
    # only the first 16 words count: a 200-character prefix usually holds 17 (then its 16th is
    # whole), and lowering and scanning a whole 4,000-character prompt was costly per request
    words = _WORD.findall(_DIGITS.sub("0", prompt[:200].lower()))
    if len(words) < 17 and len(prompt) > 200:
        words = _WORD.findall(_DIGITS.sub("0", prompt.lower()))
    if len(words) < 4:
        return None
    out, function = [words[0]], 0
    for w in words[1:16]:
        if w in _FUNCTION:
            out.append(w)
            function += 1
        elif out[-1] != "_":
            out.append("_")
    return (
        _digest(" ".join(out)) if function >= 2 else None
    )  # too little structure to be a template


@dataclass(frozen=True, slots=True)
class Features:
    account: str
    ts: float
    ip: str | None
    prompt: str  # the last user turn
    prompt_hash: str
    continues: bool  # assistant turns present: the request continues a conversation
    system_hash: str | None  # hash of the system prompt, if any
    template: str | None  # template_signature(prompt)
    logprobs: bool
    top_logprobs: int
    max_tokens: int | None
    n: int
    temperature: float | None
    cot: bool  # chain-of-thought elicitation markers in the prompt or system prompt
    prompt_tokens: int | None
    completion_tokens: int | None
    # False when the ledger kept no prompt text (hashes/off): ``prompt`` is "" then, and the
    # detectors that read text (template, cot, embeddings, near-duplicates) learn nothing from it
    has_text: bool = True

    @property
    def tokens(self) -> int:
        """Tokens billed, from ``response.usage``; estimated from characters when absent."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return max(1, len(self.prompt) // 4) + (self.max_tokens or 256) // 2
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


def _int(value, name: str, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"request field {name!r} should be a number, got {value!r}")
    return int(value)


def extract(record: dict) -> Features:
    """Features of one traffic record; a malformed record raises :class:`ConfigError`."""
    req = record["request"]
    messages = req.get("messages")
    if not isinstance(messages, list):
        messages = [{"role": "user", "content": req.get("prompt", "")}]  # completions-style request
    prompt, system, continues = "", "", False
    prompt_stored = system_stored = None  # digests of contents kept without text
    for m in messages:
        if not isinstance(m, dict):
            raise ConfigError(f"request.messages holds a non-object: {m!r:.60}")
        role = m.get("role")
        if role == "user":
            prompt, prompt_stored = _text(m.get("content")), _stored_digest(m.get("content"))
        elif role == "system" or role == "developer":
            system, system_stored = _text(m.get("content")), _stored_digest(m.get("content"))
        elif role == "assistant":
            continues = True
    usage = (record.get("response") or {}).get("usage") or {}
    top = _int(req.get("top_logprobs"), "top_logprobs", 0) or 0
    temp = req.get("temperature")
    return Features(
        account=record["account"],
        ts=float(record["ts"]),
        ip=record.get("ip"),
        prompt=prompt,
        prompt_hash=_digest(prompt) if prompt_stored is None else prompt_stored,
        continues=continues,
        system_hash=(_digest(system) if system.strip() else None)
        if system_stored is None
        else (system_stored or None),
        template=template_signature(prompt),
        logprobs=bool(req.get("logprobs")) or top > 0,
        top_logprobs=top,
        max_tokens=_int(
            req.get("max_completion_tokens", req.get("max_tokens")), "max_tokens", None
        ),
        n=_int(req.get("n"), "n", 1) or 1,
        temperature=float(temp) if isinstance(temp, (int, float)) else None,
        cot=_cot(prompt) or bool(system and _cot(system)),
        prompt_tokens=_int(usage.get("prompt_tokens"), "usage.prompt_tokens", None),
        completion_tokens=_int(usage.get("completion_tokens"), "usage.completion_tokens", None),
        has_text=prompt_stored is None,
    )
