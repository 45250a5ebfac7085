"""Extraction detection: per-request features, per-account and cross-account detectors,
calibration on benign traffic to a target false-positive rate, offline reports and an online
monitor for the gateway.

    from distillguard.detect import AccountMonitor, Calibration
    monitor = AccountMonitor(Calibration.load("calibration.npz"))
    verdict = monitor.observe(record)      # Verdict(level, score, reasons, cluster, ...)
"""

from distillguard.detect.calibrate import Calibration, calibrate
from distillguard.detect.config import DetectConfig
from distillguard.detect.features import Features, extract
from distillguard.detect.monitor import AccountMonitor, Verdict
from distillguard.detect.registry import Context, Detector, detectors, register
from distillguard.detect.report import detect

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
