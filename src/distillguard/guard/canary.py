"""Canary answers: fabricated, account-specific statements served to suspected extractors.

A canary is a fluent sentence about things that do not exist (an invented name, place and
number), drawn from an HMAC of the master secret, the account and the request id, so that

- nobody without the secret can tell a canary from an answer, or guess another account's;
- it is served in the shape of a generated answer (``serve/canned.py``);
- every canary is recorded in the ledger (the response text, ``policy_action`` has ``canary``)
  and can be recomputed from the secret;
- a suspect model that completes a canary's opening with its invented continuation learned
  from that account's traffic (``canary_prompts`` gives the (opening, continuation) pairs).

Hand-written: no library generates keyed decoy text; the word lists keep it pronounceable.
"""

from __future__ import annotations

import hashlib
import hmac

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "st",
    "th",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
_CODAS = ["", "n", "r", "s", "l", "th", "x", "m"]
_FIELDS = [
    "botanist",
    "cartographer",
    "chemist",
    "astronomer",
    "linguist",
    "engineer",
    "historian",
    "geologist",
]
_THINGS = [
    "a method for dating river sediments",
    "the first tide table of the northern coast",
    "a cipher later used by postal clerks",
    "a catalogue of alpine mosses",
    "an early design for a counting machine",
    "a grammar of a coastal dialect",
    "a map of the salt roads",
    "a treatise on glass furnaces",
]


def _stream(secret: bytes, *parts: str):
    """An endless deterministic byte stream keyed by the secret (HMAC-SHA256 in counter mode)."""
    msg = "\x1f".join(parts).encode()
    counter = 0
    while True:
        yield from hmac.new(secret, msg + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1


def _word(rng, syllables: int) -> str:
    w = "".join(
        _ONSETS[next(rng) % len(_ONSETS)]
        + _VOWELS[next(rng) % len(_VOWELS)]
        + _CODAS[next(rng) % len(_CODAS)]
        for _ in range(syllables)
    )
    return w.capitalize()


def canary(secret: bytes, account: str, request_id: str) -> tuple[str, str]:
    """(opening, continuation) of the canary for this request; the answer is both joined."""
    rng = _stream(secret, "distillguard-canary", account, request_id)
    person = f"{_word(rng, 2)} {_word(rng, 3)}"
    place = _word(rng, 3)
    field = _FIELDS[next(rng) % len(_FIELDS)]
    thing = _THINGS[next(rng) % len(_THINGS)]
    year = 1700 + (next(rng) * 256 + next(rng)) % 250
    opening = f"The {field} {person} of {place}"
    continuation = f" is best known for {thing}, published in {year}."
    return opening, continuation


def canary_text(secret: bytes, account: str, request_id: str) -> str:
    opening, continuation = canary(secret, account, request_id)
    return opening + continuation


__all__ = ["canary", "canary_text"]
