"""What a refusal looks like in a harvested answer: curate drops them, and the scrubbing
distiller's other-model answers skip them (its own module so neither imports the other)."""

from __future__ import annotations

import re

REFUSAL = re.compile(
    r"\b(as an ai (language )?model|i'?m sorry,? but|i (can(no|')t|am unable to|won'?t) (help|assist|provide|comply)"
    r"|i apologi[sz]e,? but)",
    re.IGNORECASE,
)
