"""Tiny random models for tests: built from a config, no download, deterministic per seed.

The tokenizer is byte-level BPE with no merges (256 byte tokens + ChatML specials), so any
text round-trips and token bytes are exact; the model is a 2-layer Llama (or GPT-2) with
random weights drawn from a fixed seed, so every process that loads ``tiny`` gets the same
weights (a test client and a server subprocess agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillguard.errors import ModelLoadError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2 and many instruct models use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Parsed ``tiny[-ARCH][:key=value,...]`` spec, e.g. ``tiny``, ``tiny-gpt2:layers=4``."""

    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    ctx: int = 512
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> TinySpec:
        head, _, opts = spec.partition(":")
        arch = head[len("tiny-") :] if head.startswith("tiny-") else "llama"
        if arch not in ("llama", "gpt2"):
            raise ModelLoadError(
                spec, f"unknown tiny architecture {arch!r}; use tiny, tiny-llama or tiny-gpt2"
            )
        values: dict[str, int] = {}
        for item in filter(None, opts.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("layers", "hidden", "heads", "ctx", "seed"):
                raise ModelLoadError(
                    spec, f"bad option {item!r}; options are layers=, hidden=, heads=, ctx=, seed="
                )
            try:
                values[key] = int(value)
            except ValueError:
                raise ModelLoadError(
                    spec, f"option {key} needs an integer, got {value!r}"
                ) from None
        tiny = cls(arch=arch, **values)
        if tiny.hidden % tiny.heads:
            raise ModelLoadError(
                spec, f"hidden={tiny.hidden} must be a multiple of heads={tiny.heads}"
            )
        return tiny


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are the bytes (GPT-2's printable alphabet), then specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_char)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _byte_of_char(ch: str) -> int:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return inverse[ch]


def tiny_model(
    spec: TinySpec, vocab_size: int, *, eos_id: int | None = None, pad_id: int | None = None
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if spec.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=spec.ctx,
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            bos_token_id=None,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.hidden * 2,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=max(1, spec.heads // 2),
            max_position_embeddings=spec.ctx,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            # A wider init than the default 0.02 so the random model's next-token distribution
            # is peaked rather than uniform: sampling parameters then visibly matter in tests.
            initializer_range=0.2,
        )
    # Fork the global RNG so building a tiny model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()
