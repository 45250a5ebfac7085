"""The training-data n-gram filter of the radioactivity tests (Sander et al. 2024): the watermark
windows (hash contexts) of the suspected training data, and the exact (context, token) pairs it
holds, which a valid filtered test must not score. Why, and what that costs: the module
docstring of :mod:`distillguard.forensics.radioactivity`.

The data is a JSONL file: a ledger export (``distillguard ledger export``: each record's
``response.text``, canary answers skipped, grouped by ``account``), a harvested or curated data
set (``response``, or the assistant turns of ``messages``), or plain ``{"text": ...}`` rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from distillguard.errors import ConfigError, DataFileError
from distillguard.jsonl import iter_jsonl


@dataclass(frozen=True)
class TrainingFilter:
    """The windows of the suspected training data, tokenised with the watermark's tokenizer.

    ``contexts``: every ``width``-gram of the data, the last one of each text included (whether
    a context is followed by a token is the sampler's choice at that context, which reads its
    bits; whether it occurs at all is decided before); ``pairs``: every (context, token)
    (``width + 1``-gram) of the data, for the ``exclude_data_pairs`` variant."""

    contexts: frozenset[tuple[int, ...]]
    pairs: frozenset[tuple[int, ...]]
    width: int
    texts: int
    source: str = ""
    sha256: str | None = None

    def describe(self) -> dict:
        """What evidence.json records of the filter (the windows themselves stay out: they are
        the data)."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "texts": self.texts,
            "contexts": len(self.contexts),
            "pairs": len(self.pairs),
        }


def training_filter(
    texts: Sequence[str], tokenizer, width: int, *, source: str = "", sha256: str | None = None
) -> TrainingFilter:
    """The filter of ``texts`` for a watermark of context width ``width``. Each text is tokenised
    on its own, as the closed test tokenises the suspect's answers (a window that straddles the
    chat template's tokens is in neither)."""
    if width < 1:
        raise ConfigError(f"context width {width} must be >= 1")
    contexts: set[tuple[int, ...]] = set()
    pairs: set[tuple[int, ...]] = set()
    for text in texts:
        seq = list(tokenizer.encode(text, add_special_tokens=False))
        for i in range(width, len(seq) + 1):
            contexts.add(tuple(seq[i - width : i]))
        for i in range(width, len(seq)):
            pairs.add(tuple(seq[i - width : i + 1]))
    if not pairs:
        raise ConfigError(
            f"the filter data ({source or 'texts given'}) has no text of more than {width} "
            "tokens: give the suspected training data's answers (a ledger export or a harvested "
            "data set)"
        )
    return TrainingFilter(
        frozenset(contexts), frozenset(pairs), width, len(texts), source=source, sha256=sha256
    )


def unit_weights(
    seqs: Sequence[Sequence[int]], flt: TrainingFilter, *, exclude_data_pairs: bool = False
) -> list[list[int]]:
    """One 0/1 weight per token of each sequence (the key-independent weights of
    ``watermark.detect``): 1 where the pair ending at the token has its context in the filter
    data (and, with ``exclude_data_pairs``, is not itself one of the data's pairs: valid under a
    wider null, blind to a student of exactly the data; see
    :mod:`distillguard.forensics.radioactivity`)."""
    w = flt.width
    out = []
    for seq in seqs:
        row = [0] * len(seq)
        for i in range(w, len(seq)):
            ctx = tuple(seq[i - w : i])
            if ctx in flt.contexts and not (exclude_data_pairs and ctx + (seq[i],) in flt.pairs):
                row[i] = 1
        out.append(row)
    return out


# ---- reading the filter data ----------------------------------------------------------------------


def row_answers(row: dict) -> list[str]:
    """The answers one record holds (the teacher's text the student would have trained on)."""
    response = row.get("response")
    if isinstance(response, dict):  # a ledger export's record
        if response.get("canary"):  # the gateway's fabricated answer: no watermark in it
            return []
        text = response.get("text")
        if isinstance(text, str) and text.startswith("["):  # n > 1: a JSON list of choices
            try:
                choices = json.loads(text)
            except json.JSONDecodeError:
                return [text]
            if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
                return choices
        return [text] if isinstance(text, str) else []
    if isinstance(response, str):  # a harvested / curated record
        return [response]
    if isinstance(row.get("text"), str):
        return [row["text"]]
    messages = row.get("messages")
    if isinstance(messages, list):
        return [
            m["content"]
            for m in messages
            if isinstance(m, dict)
            and m.get("role") == "assistant"
            and isinstance(m.get("content"), str)
        ]
    return []


def read_filter_data(path: str | Path) -> tuple[dict[str | None, list[str]], str]:
    """The answers of a filter-data JSONL file by account (``None``: rows without one) and the
    file's SHA-256. A missing file, or one with no answer in any row, is a ConfigError that says
    what the file must hold."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(str(path), None, "no such file (--filter-data: a JSONL file)")
    by_account: dict[str | None, list[str]] = {}
    for _, row in iter_jsonl(path):
        texts = [t for t in row_answers(row) if t.strip()]
        if texts:
            account = row.get("account")
            by_account.setdefault(account if isinstance(account, str) else None, []).extend(texts)
    if not by_account:
        raise DataFileError(
            str(path),
            None,
            "no usable rows: each line needs an answer, as a ledger export's response.text, a "
            'data set\'s "response" or assistant "messages", or a "text" field',
        )
    return by_account, hashlib.sha256(path.read_bytes()).hexdigest()


def filters_by_account(
    by_account: Mapping[str | None, Iterable[str]],
    accounts: Sequence[str],
    tokenizer,
    width: int,
    *,
    source: str = "",
    sha256: str | None = None,
) -> dict[str, TrainingFilter]:
    """One filter per tested account. Rows that name accounts filter each account by its own
    answers (an account with none gets no filter entry: its test runs unfiltered); rows without
    one are a single data set for every account."""
    named = {a: list(t) for a, t in by_account.items() if a is not None}
    if not named:
        shared = training_filter(
            list(by_account.get(None, ())), tokenizer, width, source=source, sha256=sha256
        )
        return {a: shared for a in accounts}
    return {
        a: training_filter(
            named[a], tokenizer, width, source=f"{source} (account {a})", sha256=sha256
        )
        for a in accounts
        if named.get(a)
    }


__all__ = [
    "TrainingFilter",
    "check_filterable",
    "filters_by_account",
    "read_filter_data",
    "training_filter",
    "unit_weights",
]


def check_filterable(params) -> None:
    """Refuse a scheme the filter cannot keep valid (both radioactivity tests call this)."""
    if params.scheme == "synthid":
        # SynthID's independent units are table entries, each shared by many n-grams: excluding
        # the data's n-grams leaves their (green-biased) entries reachable through other n-grams.
        raise ConfigError(
            "the training-data filter (--filter-data) needs a green-list scheme (keyed-hash, "
            "lefthash-ref): SynthID's units are shared table entries, so excluding the data's "
            "n-grams would not keep the test valid; run without --filter-data"
        )
