"""The detector contract and its registry.

A detector follows one account's request stream, one record at a time::

    det = Cls(context)                  # context: config + benign reference (+ linker)
    det.observe(features, embedding)    # embedding is None when the prompt was not embedded
    det.score() -> float                # raw statistic, larger = more like extraction
    det.reasons() -> [str]              # why, in words, for the report

Raw scores become benign tail probabilities in ``calibrate.py``, so a detector may use any
scale. Built-ins and plugins register the same way: a class decorated with ``@register``, in
a module named by an entry point of the group ``distillguard.detectors``::

    [project.entry-points."distillguard.detectors"]
    mydetector = "my_package.my_module:MyDetector"
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from distillguard.errors import ConfigError

if TYPE_CHECKING:
    from distillguard.detect.config import DetectConfig
    from distillguard.detect.features import Features
    from distillguard.detect.reference import Reference

GROUP = "distillguard.detectors"
# The built-ins' modules, also listed as entry points in pyproject.toml; imported directly as
# well so that a stale editable install (metadata from before a detector was added) still works.
BUILTIN_MODULES = (
    "volume",
    "timing",
    "shape",
    "template",
    "reasoning",
    "distribution",
    "coverage",
    "fresh",
    "linking",
)


@dataclass
class Context:
    config: DetectConfig
    reference: Reference | None = None
    linker: object | None = None  # linking.Linker, shared by every account of one scorer


class Detector(ABC):
    name: ClassVar[str]
    uses_embeddings: ClassVar[bool] = False

    def __init__(self, context: Context):
        self.context = context
        self.config = context.config

    @abstractmethod
    def observe(self, f: Features, embedding: np.ndarray | None) -> None: ...

    @abstractmethod
    def score(self) -> float: ...

    @abstractmethod
    def reasons(self) -> list[str]: ...


_registry: dict[str, type[Detector]] = {}
_loaded = False


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"detector class {cls.__qualname__} needs a class attribute `name`")
    if name in _registry and _registry[name] is not cls:
        raise ConfigError(
            f"two detectors named {name!r}: {_registry[name].__qualname__} and {cls.__qualname__}"
        )
    _registry[name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"distillguard.detect.{mod}")
    for ep in entry_points(group=GROUP):
        obj = ep.load()  # importing the module runs its @register
        if isinstance(obj, type) and issubclass(obj, Detector):
            register(obj)
    _loaded = True


def detectors() -> dict[str, type[Detector]]:
    """Every registered detector, by name (built-ins first)."""
    _load()
    return dict(_registry)


def select(names: tuple[str, ...] | list[str]) -> list[type[Detector]]:
    """The detector classes named (all when empty); an unknown name is a ConfigError."""
    known = detectors()
    if not names:
        return list(known.values())
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"unknown detector(s) {missing}; available: {sorted(known)}")
    return [known[n] for n in names]
