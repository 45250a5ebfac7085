"""Curate harvested answers into a training set: dedup, filters, verifier, decontamination, split.

Order: malformed rows out, length and refusal filters, the optional verifier, decontamination
against the evaluation prompts, exact then near-duplicate removal (MinHash LSH from datasketch
over word 3-shingles; on the prompt, the several answers of one request are kept together), and
a train/eval split by prompt (every answer to one prompt lands on the same side, so the
evaluation never sees a training question). Writes an HF ``datasets`` directory
(``load_from_disk``) and a report of how many rows each step removed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig, Number
from distillguard.distill.refusal import REFUSAL
from distillguard.errors import ConfigError

WORD = re.compile(r"\w+", re.UNICODE)


class CurateConfig(DistillConfig):
    """How ``curate`` filters, deduplicates, decontaminates and splits harvested answers; the
    ``distill curate`` options take their defaults and help from these fields."""

    min_chars: int = Field(1, description="drop answers shorter than this")
    max_chars: int | None = Field(None, description="drop answers longer than this")
    drop_refusals: bool = Field(True, description="drop answers that look like refusals")
    verifier: str | None = Field(
        None, description="module:function called with each record; keep if true"
    )
    near_dup_threshold: Number | None = Field(
        0.85,
        description="near-duplicate Jaccard threshold (MinHash); None (on the CLI: 1) keeps "
        "near-duplicates",
    )
    dedup_on: str = Field("prompt", description="prompt | response | both")
    decontam_threshold: Number = Field(
        0.5, description="drop a record whose prompt is this similar to an eval prompt"
    )
    eval_fraction: Number = Field(0.1, description="share of prompts held out for evaluation")
    seed: int = Field(0, description="split seed")
    # Off by default: a dataset of whole answers teaches a student when to stop.
    keep_capped: bool = Field(
        False,
        description="keep answers cut at the harvest's --max-tokens (a prefix of the teacher's "
        "answer; trained without an end-of-turn)",
    )
    num_perm: int = Field(128, description="MinHash permutations")

    @model_validator(mode="after")
    def _check(self) -> CurateConfig:
        if self.dedup_on not in ("prompt", "response", "both"):
            raise ConfigError(f"--dedup-on {self.dedup_on!r}: use prompt, response or both")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise ConfigError(f"--near-dup {self.near_dup_threshold} must be in (0, 1]")
        if not 0 < self.decontam_threshold <= 1:
            raise ConfigError(f"decontam_threshold {self.decontam_threshold} must be in (0, 1]")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(
                f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}: nothing would pass"
            )
        return self


@dataclass
class CurateReport:
    read: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    train: int = 0
    eval: int = 0
    scrub: dict | None = None  # what the scrub did (distill/scrub.py), when it ran

    def drop(self, reason: str) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["scrub"] is None:
            del out["scrub"]
        return out


def _chat(messages: object) -> bool:
    """A non-empty list of {'role': str, 'content': str}: what training renders with the chat template."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def prompt_text(record: dict) -> str:
    return "\n".join(
        m.get("content", "") for m in record.get("messages", []) if m.get("role") != "system"
    )


def shingles(text: str, k: int = 3) -> set[str]:
    words = WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def _minhash(text: str, num_perm: int):
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    for s in shingles(text):
        m.update(s.encode())
    return m


def load_verifier(spec: str) -> Callable[[dict], bool]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(
            f"--verifier {spec!r}: use module:function (e.g. mychecks:answer_is_correct)"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load verifier {spec!r}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"verifier {spec!r} is not callable")
    return fn


def in_eval_split(prompt_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def curate(
    records: Iterable[dict],
    config: CurateConfig,
    *,
    eval_prompts: Iterable[str] = (),
    verifier: Callable[[dict], bool] | None = None,
    scrub=None,
    scrub_model=None,
) -> tuple[list[dict], list[dict], CurateReport]:
    """Filter and split harvested records; returns (train, eval, report).

    ``scrub`` (a :class:`~distillguard.distill.scrub.Scrub`): a distiller's edits, mixing and
    outlier filtering, applied to the records before everything else, so the other-model rows
    and the edited answers meet the same filters, deduplication and split (``scrub_model``: an
    already loaded model for it)."""
    from datasketch import MinHashLSH

    report = CurateReport()
    if scrub is not None and scrub.active:
        from distillguard.distill.scrub import scrub_records

        records, scrubbed = scrub_records(list(records), scrub, model=scrub_model)
        report.scrub = {**scrubbed.to_dict(), "summary": scrubbed.describe()}
    verifier = verifier or (load_verifier(config.verifier) if config.verifier else None)
    contam = MinHashLSH(threshold=config.decontam_threshold, num_perm=config.num_perm)
    eval_exact = set()
    for i, text in enumerate(eval_prompts):
        eval_exact.add(" ".join(WORD.findall(text.lower())))
        contam.insert(f"e{i}", _minhash(text, config.num_perm))
    near = (
        MinHashLSH(threshold=config.near_dup_threshold, num_perm=config.num_perm)
        if config.near_dup_threshold
        else None
    )
    key_owner: dict[
        str, str | None
    ] = {}  # dedup key -> the prompt id that brought it (prompt dedup)
    train: list[dict] = []
    evaluation: list[dict] = []
    for record in records:
        report.read += 1
        response = record.get("response")
        if not isinstance(response, str) or not _chat(record.get("messages")):
            report.drop("malformed")
            continue
        if record.get("finish_reason") == "length" and not config.keep_capped:
            report.drop("capped")
            continue
        if len(response.strip()) < config.min_chars:
            report.drop("too_short")
            continue
        if config.max_chars is not None and len(response) > config.max_chars:
            report.drop("too_long")
            continue
        if config.drop_refusals and REFUSAL.search(response[:400]):
            report.drop("refusal")
            continue
        if verifier is not None and not verifier(record):
            report.drop("verifier")
            continue
        prompt = prompt_text(record)
        if eval_exact and (
            " ".join(WORD.findall(prompt.lower())) in eval_exact
            or contam.query(_minhash(prompt, config.num_perm))
        ):
            report.drop("contaminated")
            continue
        key_text = {"prompt": prompt, "response": response, "both": prompt + "\n" + response}[
            config.dedup_on
        ]
        exact = hashlib.sha256(" ".join(WORD.findall(key_text.lower())).encode()).hexdigest()
        pid = str(record.get("prompt_id") or record.get("id") or exact)
        # Deduplicating on the prompt, the answers of one request (the API's n > 1) share it:
        # siblings, not duplicates. A prompt key belongs to the prompt id that brought it first and
        # only another prompt id's copy goes. On responses, a repeated answer goes whoever asked.
        owner = pid if config.dedup_on == "prompt" else None
        if exact in key_owner:
            if owner is None or key_owner[exact] != owner:
                report.drop("duplicate")
                continue
        elif near is not None:
            mh = _minhash(key_text, config.num_perm)
            if any(owner is None or key_owner[hit] != owner for hit in near.query(mh)):
                report.drop("near_duplicate")
                continue
            near.insert(exact, mh)
        key_owner.setdefault(exact, owner)
        (evaluation if in_eval_split(pid, config.eval_fraction, config.seed) else train).append(
            record
        )
    report.train, report.eval = len(train), len(evaluation)
    return train, evaluation, report


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such data file: {path}")
    from distillguard.jsonl import read_jsonl as read

    return read(path)


def save_dataset(train: list[dict], evaluation: list[dict], out: str | Path) -> None:
    """An HF ``DatasetDict`` with train/eval splits (chat ``messages`` + the teacher ``response``)."""
    from datasets import Dataset, DatasetDict, Features, List, Value

    # Explicit features: an empty split (e.g. no eval prompts) must still have the schema.
    features = Features(
        {
            "id": Value("string"),
            "prompt_id": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "response": Value("string"),
            "logprobs": Value("string"),
            "finish_reason": Value("string"),
        }
    )

    def rows(records: list[dict]) -> Dataset:
        return Dataset.from_dict(
            {
                "id": [str(r.get("id", i)) for i, r in enumerate(records)],
                "prompt_id": [str(r.get("prompt_id", "")) for r in records],
                "messages": [r["messages"] for r in records],
                "response": [r["response"] for r in records],
                # top-k logprobs per token as JSON (ragged, optional): kept for sparse KD
                "logprobs": [
                    json.dumps(r.get("logprobs")) if r.get("logprobs") else "" for r in records
                ],
                # "length" marks an answer cut at max_tokens (kept with keep_capped): trained without an end
                "finish_reason": [str(r.get("finish_reason") or "") for r in records],
            },
            features=features,
        )

    # One shard per split at least: datasets cannot reload an empty split saved with zero shards.
    DatasetDict({"train": rows(train), "eval": rows(evaluation)}).save_to_disk(
        str(out), num_shards={"train": 1, "eval": 1}
    )
