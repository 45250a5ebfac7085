"""What a model spec names, decided in one place for every command that takes a model.

``forensics --suspect``, ``distill eval --student/--baseline``, ``distill train --student``,
``serve --model`` and the arena all hand their spec to :func:`distillguard.models.load_model`,
which asks :func:`parse_spec` what it is. Parsing imports neither torch nor transformers, so a
CLI can check a spec (and fail on a typo) before it loads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distillguard.errors import ConfigError, ModelLoadError

BUNDLED = ("smollm2", "default")
PRUNE_METHODS = ("influence", "block", "even")
PRUNE_USAGE = f"prune:K[:{'|'.join(PRUNE_METHODS)}][:mlpW][@TEACHER]"

# (form, what it is): the list an unknown spec's error message shows.
FORMS = (
    ("smollm2", "the embedded teacher, SmolLM2-135M-Instruct (also: default)"),
    ("tiny[-gpt2][:layers=N,...]", "a random model for tests"),
    (
        PRUNE_USAGE,
        "K layers of the teacher (the command's teacher, or @TEACHER), MLPs cut to W neurons",
    ),
    ("PATH.gguf", "a GGUF file"),
    ("DIR", "a local checkpoint directory (save_pretrained layout)"),
    ("ORG/NAME", "a Hugging Face Hub id (needs the network or a warm HF cache)"),
)

Kind = Literal["bundled", "tiny", "prune", "gguf", "dir", "hub"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``teacher`` is a prune spec's own ``@TEACHER`` (None: the caller's)."""

    text: str
    kind: Kind
    keep: int | None = None  # prune: layers kept
    how: str = "influence"  # prune: how they are chosen
    width: int | None = None  # prune: MLP neurons kept per layer (None: all)
    teacher: str | None = None


def accepted_forms() -> str:
    return "; ".join(f"{form} ({what})" for form, what in FORMS)


def parse_prune_spec(spec: str) -> tuple[int, str, int | None]:
    """``prune:K[:how][:mlpW][@TEACHER]`` -> (K, how, W or None); the teacher is not checked."""
    usage = f"use {PRUNE_USAGE} with integers K and W"
    body = spec.partition("@")[0]
    _, keep, *rest = body.split(":")
    how, width = "influence", None
    try:
        keep = int(keep)
        if rest and rest[0] in PRUNE_METHODS:
            how = rest.pop(0)
        if rest and rest[0].startswith("mlp"):
            width = int(rest.pop(0)[3:])
        if rest:
            raise ValueError(rest)
    except ValueError:
        raise ConfigError(f"model spec {spec!r}: {usage}") from None
    return keep, how, width


def parse_spec(spec: str) -> ModelSpec:
    """What ``spec`` names (see :data:`FORMS`); a ModelLoadError listing the forms when it
    cannot be any of them."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(str(spec), f"empty model spec; use one of: {accepted_forms()}")
    if spec in BUNDLED:
        return ModelSpec(spec, "bundled")
    if spec == "tiny" or spec.startswith(("tiny-", "tiny:")):
        return ModelSpec(spec, "tiny")
    if spec.startswith("prune:"):
        keep, how, width = parse_prune_spec(spec)
        teacher = spec.partition("@")[2] or None
        if teacher is not None:
            inner = parse_spec(teacher)
            if inner.kind == "prune":
                raise ModelLoadError(spec, "the @TEACHER of a prune spec cannot itself be pruned")
        return ModelSpec(spec, "prune", keep=keep, how=how, width=width, teacher=teacher)
    if spec.endswith(".gguf"):
        return ModelSpec(spec, "gguf")
    local = Path(spec).expanduser()
    if local.is_dir():
        return ModelSpec(spec, "dir")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(spec, f"no such directory: {local}")
    if spec.count("/") == 1 and not all(spec.split("/")):
        raise ModelLoadError(spec, f"not a Hub id (ORG/NAME); use one of: {accepted_forms()}")
    # A bare NAME may be a legacy Hub id (gpt2): the Hub decides, and its failure lists the forms.
    return ModelSpec(spec, "hub")


__all__ = [
    "BUNDLED",
    "FORMS",
    "PRUNE_METHODS",
    "PRUNE_USAGE",
    "ModelSpec",
    "accepted_forms",
    "parse_prune_spec",
    "parse_spec",
]
