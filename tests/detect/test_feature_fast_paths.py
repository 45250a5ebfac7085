"""Per-request feature shortcuts (features.py) give exactly what the plain computation gives, on
every turn of the arena's real prompt pools and on the edge cases each shortcut has."""

from __future__ import annotations

import pytest

from distillguard.arena import load_pools
from distillguard.detect.features import (
    _DIGITS,
    _FUNCTION,
    _WORD,
    COT_MARKERS,
    _cot,
    _digest,
    template_signature,
)

EDGES = [
    "ſtep by ſtep",  # IGNORECASE folds the long s to s: the non-ASCII path keeps that
    "STEP BY STEP please",
    "\u212aeep it short; Let's think",  # Kelvin sign
    "İ" * 150 + " a the of " * 30,  # lowering changes the length
    "x٣y " * 100,  # a non-ASCII digit folds to 0 inside a word
    "word " * 16 + "a" * 300,  # the 16th word ends at the prefix's edge
    "12 34 " * 50 + "the a of",
    "write a poem about the sea",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [x for pool in load_pools().values() for t in pool for x in t.turns] + EDGES


def _template_whole_prompt(prompt: str) -> str | None:
    """template_signature as written before it read a prefix: the whole prompt lowered."""
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
    return _digest(" ".join(out)) if function >= 2 else None


def test_template_signature_reads_a_prefix_without_changing_it(texts):
    assert len(texts) > 10_000
    assert all(template_signature(t) == _template_whole_prompt(t) for t in texts)


def test_cot_on_lowered_ascii_equals_ignorecase(texts):
    found = [bool(COT_MARKERS.search(t)) for t in texts]
    assert [_cot(t) for t in texts] == found
    assert sum(found) > 50  # the pools hold chain-of-thought prompts: the test has teeth
