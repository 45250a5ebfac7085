"""The detector contract and its registry.

A detector follows one account's request stream, one record at a time::

    det = Cls(context)                  # context: config + benign reference (+ linker)
    det.observe(features, embedding)    # embedding is None when the prompt was not embedded
    det.score() -> float                # raw statistic, larger = more like extraction
    det.reasons() -> [str]              # why, in words, for the report

Raw scores become benign tail probabilities in ``calibrate.py``, so a detector may use any
scale. Built-ins and plugins register the same way, as an entry point of the group
``distillguard.detectors`` (read by :class:`distillguard.plugins.Registry`)::

    [project.entry-points."distillguard.detectors"]
    mydetector = "my_package.my_module:MyDetector"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from distillguard.errors import ConfigError
from distillguard.plugins import Registry

if TYPE_CHECKING:
    from distillguard.detect.config import DetectConfig
    from distillguard.detect.features import Features
    from distillguard.detect.reference import Reference

GROUP = "distillguard.detectors"


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


def _check(name: str, obj: object) -> type[Detector]:
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise ConfigError(f"detector {name!r} is {obj!r}, not a subclass of Detector")
    if getattr(obj, "name", None) != name:
        raise ConfigError(
            f"detector class {obj.__qualname__} has name {getattr(obj, 'name', None)!r} but is "
            f"registered as {name!r}: make its class attribute `name` {name!r}"
        )
    return obj


DETECTORS: Registry[type[Detector]] = Registry(GROUP, "detector", check=_check)


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector defined in code (a script, a test) available by its
    ``name``. A package ships one through an entry point instead; its module may keep the
    decorator, which is harmless for a class that an entry point also names."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"detector class {cls.__qualname__} needs a class attribute `name`")
    DETECTORS.add(name, cls)
    return cls


def detectors() -> dict[str, type[Detector]]:
    """Every registered detector, by name (built-ins first)."""
    return DETECTORS.all()


def select(names: tuple[str, ...] | list[str]) -> list[type[Detector]]:
    """The detector classes named (all when empty); an unknown name is a ConfigError."""
    known = detectors()
    if not names:
        return list(known.values())
    missing = [n for n in names if n not in known]
    if missing:
        broken = {n: DETECTORS.errors[n] for n in missing if n in DETECTORS.errors}
        if broken:
            raise ConfigError(f"detector(s) failed to load: {broken}")
        raise ConfigError(
            f"unknown detector(s) {missing}; available: {sorted(known)} "
            f"(a plugin package adds one in the entry-point group {GROUP!r})"
        )
    return [known[n] for n in names]
