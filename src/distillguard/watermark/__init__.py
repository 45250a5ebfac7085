"""Keyed green-list watermarks per account: embedding (logits processor) and exact detection."""

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
    "green_mask",
    "holm",
    "is_green",
    "reference_key",
    "scored_pairs",
    "trace",
]
