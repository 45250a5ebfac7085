"""Extraction detection: per-request features, per-account and cross-account detectors,
calibration on benign traffic to a target false-positive rate, offline reports and an online
monitor for the gateway.

    from distillguard.detect import AccountMonitor, Calibration
    monitor = AccountMonitor(Calibration.load("calibration.npz"))
    verdict = monitor.observe(record)      # Verdict(level, score, reasons, cluster, ...)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# Names re-exported from their modules on first use (PEP 562): the CLI reads DetectConfig's
# fields to build `detect`'s options at start-up, and importing calibrate, monitor and linking
# eagerly (scipy, datasketch) took ~2.8 s of every `distillguard` command's start.
_EXPORTS = {
    "AccountMonitor": "monitor",
    "Calibration": "calibrate",
    "Context": "registry",
    "DetectConfig": "config",
    "Detector": "registry",
    "Features": "features",
    "Verdict": "monitor",
    "calibrate": "calibrate",
    "detect": "report",
    "detectors": "registry",
    "extract": "features",
    "register": "registry",
}

if TYPE_CHECKING:
    from distillguard.detect.calibrate import Calibration, calibrate
    from distillguard.detect.config import DetectConfig
    from distillguard.detect.features import Features, extract
    from distillguard.detect.monitor import AccountMonitor, Verdict
    from distillguard.detect.registry import Context, Detector, detectors, register
    from distillguard.detect.report import detect


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule calibrate binds it to the package's name `calibrate`, which
        # re-exports the function of that name (the eager imports used to rebind it after):
        # leave the name to __getattr__, which gives the function.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # a module attribute from now on: __getattr__ is not asked again
    return value


__all__ = [
    "AccountMonitor",
    "Calibration",
    "Context",
    "DetectConfig",
    "Detector",
    "Features",
    "Verdict",
    "calibrate",
    "detect",
    "detectors",
    "extract",
    "register",
]
