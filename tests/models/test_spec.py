"""One resolver of model specs: every form parses to what it names, a prune:K student is cut from
the caller's teacher (or its own @TEACHER), and a spec that is none of them fails naming the forms."""

from __future__ import annotations

import pytest
import torch

from distillguard.errors import ConfigError, ModelLoadError
from distillguard.models import load_model, load_tokenizer, parse_spec


@pytest.mark.parametrize(
    "spec,kind",
    [
        ("smollm2", "bundled"),
        ("default", "bundled"),
        ("tiny", "tiny"),
        ("tiny-gpt2:layers=3", "tiny"),
        ("prune:15", "prune"),
        ("prune:15:block:mlp896@tiny", "prune"),
        ("/some/where/model.gguf", "gguf"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
        ("gpt2", "hub"),  # a legacy Hub id without an organisation
    ],
)
def test_every_form_parses_to_its_kind(spec, kind):
    assert parse_spec(spec).kind == kind


def test_a_directory_is_a_directory_before_it_is_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    monkeypatch.chdir(tmp_path)  # "org/x" is ORG/NAME-shaped; a local directory wins when it exists
    (tmp_path / "org" / "x").mkdir()
    assert parse_spec("org/x").kind == "dir"
    assert parse_spec("org/y").kind == "hub"


def test_prune_spec_fields():
    spec = parse_spec("prune:15:block:mlp896@tiny:layers=4")
    assert (spec.keep, spec.how, spec.width, spec.teacher) == (15, "block", 896, "tiny:layers=4")
    assert (parse_spec("prune:3").how, parse_spec("prune:3").width) == ("influence", None)


@pytest.mark.parametrize(
    "spec,error,fragment",
    [
        ("prune:x", ConfigError, "prune:K"),
        ("prune:3:mlp8:even", ConfigError, "prune:K"),
        ("prune:3@prune:2", ModelLoadError, "cannot itself be pruned"),
        ("", ModelLoadError, "prune:K"),
        ("org/", ModelLoadError, "ORG/NAME"),
        ("./no/such/dir", ModelLoadError, "no such directory"),
    ],
)
def test_bad_specs_say_what_is_accepted(spec, error, fragment):
    with pytest.raises(error) as info:
        parse_spec(spec)
    assert fragment in str(info.value)


def test_prune_student_is_cut_from_the_callers_teacher():
    teacher = load_model("tiny:layers=4", device="cpu")
    before = [p.clone() for p in teacher.model.parameters()]
    student = load_model("prune:2:even:mlp64", device="cpu", teacher=teacher)
    assert student.model.config.num_hidden_layers == 2
    assert student.model.config.intermediate_size == 64
    # the teacher handed in is untouched (the student is a copy)
    assert teacher.model.config.num_hidden_layers == 4
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))
    # evenly spaced layers 0 and 3 of the teacher, MLPs cut: its first layer's attention is the teacher's
    assert torch.equal(
        student.model.model.layers[0].self_attn.q_proj.weight,
        teacher.model.model.layers[0].self_attn.q_proj.weight,
    )
    # by spec: the same student from the teacher's spec, given to the call or inside the spec
    by_arg = load_model("prune:2:even:mlp64", device="cpu", teacher="tiny:layers=4")
    by_spec = load_model("prune:2:even:mlp64@tiny:layers=4", device="cpu", teacher="smollm2")
    ids = torch.tensor([teacher.chat_ids([{"role": "user", "content": "hi"}])])
    with torch.inference_mode():
        want = student.model(ids).logits
        assert torch.allclose(by_arg.model(ids).logits, want)
        assert torch.allclose(by_spec.model(ids).logits, want)
    assert len(load_tokenizer("prune:1@tiny")) == len(teacher.tokenizer) == 259


def test_an_unreachable_hub_id_lists_the_accepted_forms(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message
    assert all(form in message for form in ("smollm2", "tiny", "prune:K", ".gguf", "ORG/NAME"))
