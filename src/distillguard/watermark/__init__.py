"""Per-account watermarks behind one :class:`Scheme` protocol (green lists, SynthID-Text):
embedding, exact detection, tracing. ``WatermarkParams.impl`` is a configuration's scheme."""

from distillguard.watermark.detect import (
    Detection,
    Trace,
    binomial_test,
    detect_tokens,
    holm,
    scored_pairs,
    trace,
)
from distillguard.watermark.entropy import detect_with_teacher
from distillguard.watermark.processor import WatermarkLogitsProcessor, apply_watermark
from distillguard.watermark.protocol import SCHEMES, Scheme, get_scheme, scheme_names
from distillguard.watermark.scheme import (
    REFERENCE_HASH_KEY,
    WatermarkKey,
    WatermarkParams,
    account_key,
    green_mask,
    is_green,
    reference_key,
)

__all__ = [
    "REFERENCE_HASH_KEY",
    "SCHEMES",
    "Scheme",
    "Detection",
    "Trace",
    "WatermarkKey",
    "WatermarkLogitsProcessor",
    "WatermarkParams",
    "account_key",
    "apply_watermark",
    "binomial_test",
    "detect_tokens",
    "detect_with_teacher",
    "get_scheme",
    "green_mask",
    "holm",
    "is_green",
    "reference_key",
    "scheme_names",
    "scored_pairs",
    "trace",
]
