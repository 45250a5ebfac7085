"""Investigating a suspect model: was it distilled from our outputs, and from which accounts?"""

from distillguard.forensics.radioactivity import (
    KeyEvidence,
    RadioactivityResult,
    SuspectAPIError,
    chernoff_log_p,
    closed_radioactivity,
    closed_test,
    generate_answers,
    generate_via_api,
    open_radioactivity,
    open_test,
)

__all__ = [
    "KeyEvidence",
    "RadioactivityResult",
    "SuspectAPIError",
    "chernoff_log_p",
    "closed_radioactivity",
    "closed_test",
    "generate_answers",
    "generate_via_api",
    "open_radioactivity",
    "open_test",
]
