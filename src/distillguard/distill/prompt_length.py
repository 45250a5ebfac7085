"""Prompt length in the teacher's tokens, for ``--max-prompt-tokens`` (harvest, self-instruct, eval).

A prompt is counted as the teacher prefills it: rendered by the tokenizer's chat template (system
prompt and assistant cue included), so the count is the ``prompt_tokens`` the teacher bills and
the prefill its engine runs. Characters are no substitute: ShareGPT holds code and non-Latin
scripts whose tokens per character differ several-fold from English prose.

Prompts over the cap are skipped, not truncated: a cut prompt is another question (often one
that ends mid-sentence or mid-code-block), and a student would learn the teacher's answer to
it as the answer to the cut text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

# Keeps 91.8% of the 11,168 bundled ShareGPT first prompts (bench/results/harvest_prompt_length.json:
# median 64 tokens, 90th percentile 824, the longest 230,972); each of the 8% over it costs a CPU
# teacher a prefill of 16 median prompts or more, and such prompts stalled a concurrency-16
# harvest (issue 28). Of the first 600, 73
# are over it.
DEFAULT_MAX_PROMPT_TOKENS = 1024
DEFAULT_TOKENIZER = "smollm2"

MAX_PROMPT_TOKENS_HELP = (
    "skip (do not send) prompts longer than this many tokens, counted with --tokenizer in its "
    "chat template (system prompt included); counted in the summary; 0 sends every prompt"
)
TOKENIZER_HELP = (
    "tokenizer that counts --max-prompt-tokens: the teacher's if you have it locally (HF id, "
    "directory, FILE.gguf); default: the embedded teacher's bundled SmolLM2 tokenizer"
)


class PromptTokenCounter:
    """Counts a chat prompt's tokens as the teacher's chat template renders it."""

    def __init__(self, tokenizer, spec: str):
        self.tokenizer = tokenizer
        self.spec = spec
        self._templated = bool(getattr(tokenizer, "chat_template", None))

    @staticmethod
    def load(spec: str = DEFAULT_TOKENIZER) -> PromptTokenCounter:
        return _load(spec)

    def count(self, messages: Sequence[dict]) -> int:
        if self._templated:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        # A tokenizer without a template (a base model's): its contents, which the teacher's own
        # template can only lengthen.
        return sum(
            len(self.tokenizer.encode(str(m.get("content", "")), add_special_tokens=False))
            for m in messages
        )


@lru_cache(maxsize=4)
def _load(spec: str) -> PromptTokenCounter:
    # Once per process: self-instruct calls the harvest once per round.
    from distillguard.models import load_tokenizer

    return PromptTokenCounter(load_tokenizer(spec), spec)


def over_cap_message(skipped: int, cap: int, of: int, counter: str) -> str:
    """The summary's line for prompts the cap kept out."""
    return (
        f"skipped {skipped} of {of} prompts over --max-prompt-tokens {cap} (counted with the "
        f"{counter} tokenizer; 0 sends every prompt)"
    )
