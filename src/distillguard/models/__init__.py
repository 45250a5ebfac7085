"""Load causal LMs from every source a user has (see :func:`load_model`)."""

from distillguard.models.loader import (
    DEFAULT_SPEC,
    LoadedModel,
    bundled_gguf_path,
    load_model,
    load_tokenizer,
    pick_device,
)
from distillguard.models.tiny import TinySpec

__all__ = [
    "DEFAULT_SPEC",
    "LoadedModel",
    "TinySpec",
    "bundled_gguf_path",
    "load_model",
    "load_tokenizer",
    "pick_device",
]
