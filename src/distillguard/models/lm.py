"""A loaded causal LM: the model, its tokenizer, and what a server or a test needs to know."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from distillguard.models.tokens import token_bytes_table


@dataclass
class LoadedModel:
    """A causal LM ready to generate: model, tokenizer and what the server needs to know."""

    spec: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    context_length: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def vocab_size(self) -> int:
        # The model's output layer may be padded beyond the tokenizer's vocabulary.
        return int(self.model.get_output_embeddings().weight.shape[0])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template, ending with the assistant cue."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(
            ids, "input_ids"
        ):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        table = token_bytes_table(self.tokenizer)
        # Pad to the model's (possibly larger) output size: such ids decode to nothing.
        return table + [b""] * max(0, self.vocab_size - len(table))
