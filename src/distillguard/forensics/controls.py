"""The report's default controls: models of the suspect's own architecture known not to be
distilled from the teacher.

A fingerprint test (identity, similarity) compares the suspect with models that were *not*
distilled; which models those are decides what the test can show. Two default controls, both
built from the suspect's own record of how it was trained (``train_summary.json``, written by
``distillguard distill train``):

- the **untrained student**: the spec the suspect was trained from (``prune:15:mlp896`` cut from
  its recorded teacher, ``tiny:seed=1``, ...), its starting point before any data;
- a **student trained on non-teacher data**: the same spec, trained by the same trainer on the
  bundled ShareGPT first turns, whose answers ChatGPT wrote, not the teacher. Text of any kind
  makes a model answer more like any chat model than random weights do
  (tests/forensics/test_report.py measured it), so an untrained control alone would call every
  trained model similar.

The trained control is built once and cached under ``cache_dir()/forensics-controls/KEY``, KEY
the SHA-256 of (student spec, teacher spec, the exact training pairs, the recipe); building it
twice gives the same key and is skipped. A suspect without such a record (a URL, a bare spec,
a student the caller built by hand) gets no default control, and the report says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from distillguard.errors import ConfigError
from distillguard.forensics.respondent import is_url

SUMMARY = "train_summary.json"
KIND_UNTRAINED = "untrained student"
KIND_OTHER_DATA = "student trained on non-teacher data (ShareGPT answers by ChatGPT)"


@dataclass(frozen=True)
class ControlRecipe:
    """How the non-teacher control is trained: cheap on CPU by design (one epoch over 128 short
    ShareGPT first turns with prompts of 200 characters at most, 256 tokens at most: 16 optimiser
    steps), since the point is a model
    that has seen chat text that is not the teacher's, not a good model."""

    pairs: int = 128
    # short prompts, so that even a byte-level tokenizer keeps every answer within max_length
    max_prompt_chars: int = 200
    offset: int = 0  # first pair used (a different slice of ShareGPT: another control)
    epochs: float = 1.0
    max_length: int = 256
    batch_size: int = 8
    lr: float = 5e-4
    seed: int = 0


@dataclass(frozen=True)
class Origin:
    """What a trained student records about where it came from."""

    student: str  # the spec it was trained from, made self-contained (prune:K@TEACHER)
    teacher: str


@dataclass(frozen=True)
class DefaultControl:
    kind: str
    spec: str
    built: dict  # how it was made: the origin, and for the trained one its recipe and key

    def label(self) -> str:
        return f"default control ({self.kind}): {self.spec}"


def suspect_origin(spec: str) -> tuple[Origin | None, str | None]:
    """(the suspect's recorded origin, None) or (None, why there is none)."""
    if is_url(spec):
        return None, "the suspect is a URL: its training record is not visible"
    path = Path(spec).expanduser()
    summary = path / SUMMARY
    if not summary.is_file():
        return None, (
            f"{spec} has no {SUMMARY} (not trained by `distillguard distill train`): the "
            "student spec it started from is unknown; pass --controls"
        )
    try:
        record = json.loads(summary.read_text())
        student, teacher = record["student"], record["config"]["teacher"]
    except (ValueError, KeyError, TypeError) as exc:
        return (
            None,
            f"{summary} does not name the student spec and teacher ({exc}); pass --controls",
        )
    if record.get("student_given"):
        return None, (
            f"{summary} says the student was built by the caller, so {student!r} only names it; "
            "pass --controls"
        )
    if student.startswith("prune:") and "@" not in student:
        student = f"{student}@{teacher}"
    return Origin(student=student, teacher=teacher), None


def _pairs(recipe: ControlRecipe) -> list[tuple[str, str]]:
    from distillguard.data.sharegpt import first_turn_pairs

    pairs = first_turn_pairs(
        recipe.offset + recipe.pairs, max_prompt_chars=recipe.max_prompt_chars
    )[recipe.offset :]
    if len(pairs) < recipe.pairs:
        raise ConfigError(
            f"the bundled ShareGPT data has {len(pairs)} usable pairs after offset "
            f"{recipe.offset}, fewer than {recipe.pairs}"
        )
    return pairs


def control_key(origin: Origin, recipe: ControlRecipe, pairs: list[tuple[str, str]]) -> str:
    data = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    blob = {"student": origin.student, "teacher": origin.teacher, "data": data, **asdict(recipe)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def trained_control(
    origin: Origin, recipe: ControlRecipe = ControlRecipe(), progress=None
) -> tuple[Path, dict]:
    """The student of ``origin.student`` trained on ShareGPT answers: (its directory, how it was
    built). Cached by key; built in a temporary directory and renamed, so a crash leaves no half
    control for the next report to use."""
    from distillguard.distill.curate import save_dataset
    from distillguard.distill.train import TrainConfig, train
    from distillguard.models.loader import cache_dir

    pairs = _pairs(recipe)
    key = control_key(origin, recipe, pairs)
    root = cache_dir() / "forensics-controls"
    out = root / key
    built = {
        "origin": asdict(origin),
        "recipe": asdict(recipe),
        "data": "bundled ShareGPT first turns (prompt, ChatGPT's answer)",
        "data_sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest(),
        "cache_key": key,
    }
    if (out / SUMMARY).is_file():
        return out, {**built, "cached": True}
    if progress is not None:
        progress(f"training the default control {origin.student} on ShareGPT answers ...")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        rows = [
            {
                "id": str(i),
                "prompt_id": f"sharegpt-{recipe.offset + i}",
                "messages": [{"role": "user", "content": p}],
                "response": a,
            }
            for i, (p, a) in enumerate(pairs)
        ]
        save_dataset(rows, [], work / "data")
        config = TrainConfig(
            data=str(work / "data"),
            out=str(work / "student"),
            student=origin.student,
            teacher=origin.teacher,
            loss="sft",
            epochs=recipe.epochs,
            max_length=recipe.max_length,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=recipe.seed,
            save_steps=0,
        )
        train(config)
        try:
            os.replace(work / "student", out)
        except OSError:
            if not (out / SUMMARY).is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, {**built, "cached": False}


def default_controls(
    suspect: str, recipe: ControlRecipe = ControlRecipe(), progress=None
) -> tuple[list[DefaultControl], str | None]:
    """The suspect's default controls, or ([], why there are none)."""
    origin, why = suspect_origin(suspect)
    if origin is None:
        return [], why
    directory, built = trained_control(origin, recipe, progress)
    return [
        DefaultControl(KIND_UNTRAINED, origin.student, {"origin": asdict(origin)}),
        DefaultControl(KIND_OTHER_DATA, str(directory), built),
    ], None


__all__ = [
    "ControlRecipe",
    "DefaultControl",
    "Origin",
    "control_key",
    "default_controls",
    "suspect_origin",
    "trained_control",
]
