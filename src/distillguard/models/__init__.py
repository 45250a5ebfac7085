"""Load causal LMs from every source a user has (see :func:`load_model`); what a spec names is
decided by :func:`parse_spec`."""

from distillguard.models.lm import LoadedModel
from distillguard.models.loader import (
    DEFAULT_SPEC,
    bundled_gguf_path,
    load_model,
    load_tokenizer,
    pick_device,
)
from distillguard.models.spec import ModelSpec, accepted_forms, parse_spec
from distillguard.models.tiny import TinySpec

__all__ = [
    "DEFAULT_SPEC",
    "LoadedModel",
    "ModelSpec",
    "TinySpec",
    "accepted_forms",
    "bundled_gguf_path",
    "load_model",
    "load_tokenizer",
    "parse_spec",
    "pick_device",
]
