"""Exact bytes of every token, for the ``bytes`` field of OpenAI logprobs.

A token's *string* may be half of a UTF-8 character; its bytes are what clients need to
reassemble text. Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) store bytes through
GPT-2's printable alphabet; SentencePiece vocabularies use ``▁`` for space and ``<0xNN>`` for
byte fallback. Neither tokenizers nor transformers expose a per-token byte table, hence this.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_bytes_table(tokenizer) -> list[bytes]:
    """``table[id]`` is the UTF-8 byte string that token ``id`` contributes to decoded text."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_tokens) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    byte_level = _is_byte_level(tokenizer)
    decoder = _gpt2_byte_decoder()
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(piece.encode())
        elif byte_level and all(c in decoder for c in piece):
            table.append(bytes(decoder[c] for c in piece))
        elif (m := _BYTE_FALLBACK.match(piece)) is not None:
            table.append(bytes([int(m.group(1), 16)]))
        elif "▁" in piece:
            table.append(piece.replace("▁", " ").encode())
        else:
            table.append(tokenizer.decode([i]).encode())
    return table
