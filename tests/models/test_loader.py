"""load_model for every source: tiny random models, local checkpoints, GGUF files, HF ids."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from distillguard.errors import ModelLoadError
from distillguard.models import TinySpec, bundled_gguf_path, load_model
from distillguard.serve.process import distillguard_command


def test_tiny_is_deterministic_and_small():
    a, b = load_model("tiny"), load_model("tiny")
    assert a.vocab_size == len(a.tokenizer) == 259
    assert a.context_length == 512
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    other = load_model("tiny:seed=1")
    assert not torch.equal(next(a.model.parameters()), next(other.model.parameters()))


def test_tiny_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "spec,arch,layers,ctx",
    [
        ("tiny", "llama", 2, 512),
        ("tiny-gpt2", "gpt2", 2, 512),
        ("tiny:layers=3,ctx=128", "llama", 3, 128),
    ],
)
def test_tiny_variants(spec, arch, layers, ctx):
    lm = load_model(spec)
    assert TinySpec.parse(spec).arch == arch
    assert lm.model.config.num_hidden_layers == layers
    assert lm.context_length == ctx
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    assert lm.model(ids).logits.shape == (1, ids.shape[1], lm.vocab_size)


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("tiny-bert", "unknown tiny architecture"),
        ("tiny:layers=x", "needs an integer"),
        ("tiny:depth=2", "bad option"),
        ("tiny:hidden=30,heads=4", "multiple of heads"),
        ("/nonexistent/model.gguf", "no such GGUF file"),
        ("./no/such/dir", "no such directory"),
    ],
)
def test_bad_specs_name_the_spec(spec, fragment):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert spec in str(info.value) and fragment in str(info.value)


def test_tiny_tokenizer_bytes_round_trip():
    lm = load_model("tiny")
    text = "naïve café – 東京 🙂"
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte
    assert b"".join(lm.token_bytes[i] for i in ids) == text.encode()
    assert lm.tokenizer.decode(ids) == text


def test_chat_template_is_exposed():
    lm = load_model("tiny")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    text = lm.tokenizer.decode(lm.chat_ids(messages))
    assert text.endswith("<|im_start|>assistant\n")
    assert all(m["content"] in text for m in messages)
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in lm.eos_token_ids


def test_local_checkpoint_directory(tmp_path):
    lm = load_model("tiny")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "same weights?"}])])
    assert torch.allclose(lm.model(ids).logits, again.model(ids).logits)
    assert again.chat_ids([{"role": "user", "content": "x"}]) == lm.chat_ids(
        [{"role": "user", "content": "x"}]
    )


def test_unreachable_hub_id_is_one_clear_line():
    """Offline, a Hub id fails with a message naming the spec, not a stack trace (CLI boundary)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        distillguard_command("serve", "--model", "no-such-org/no-such-model", "--port", "0"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no-such-org/no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bundled_teacher_loads_from_gguf_and_path():
    lm = load_model("smollm2")
    assert lm.context_length == 8192 and lm.vocab_size == 49152
    assert lm.tokenizer.convert_tokens_to_ids("<|im_end|>") in lm.eos_token_ids
    # Exact token bytes agree with the tokenizer's own decoding on real text.
    text = "The capital of France is Paris. Ça va? 東京 🙂\n"
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(lm.token_bytes[i] for i in ids).decode() == lm.tokenizer.decode(ids) == text
    # The same file through the generic .gguf path gives the same weights.
    by_path = load_model(str(bundled_gguf_path()))
    ids_t = torch.tensor([ids])
    assert torch.allclose(lm.model(ids_t).logits, by_path.model(ids_t).logits)


def test_a_converted_model_cached_by_another_process_first_is_not_an_error(tmp_path, caplog):
    """Two processes converting the bundled GGUF at once (a server and a bench, say) both save the
    cache; the loser's rename finds the winner's directory, which is the cache it wanted."""
    from distillguard.models.loader import _save_cache

    lm = load_model("tiny")
    target = tmp_path / "gguf" / "model-key"
    target.parent.mkdir()
    _save_cache(lm.model, lm.tokenizer, target)
    with caplog.at_level("WARNING"):
        _save_cache(lm.model, lm.tokenizer, target)
    assert not [r for r in caplog.records if "could not cache" in r.getMessage()]
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "model-key"
    ]  # no temporary directory left
    again = load_model(str(target))
    for a, b in zip(lm.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, caplog):
    from distillguard.models.loader import _save_cache

    lm = load_model("tiny")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING"):
        _save_cache(lm.model, lm.tokenizer, blocker / "model-key")
    assert [r for r in caplog.records if "could not cache" in r.getMessage()]
