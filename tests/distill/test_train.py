"""Student training: loss masks, the sparse KD loss, pruned students, and short real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillguard.distill.curate import save_dataset
from distillguard.distill.losses import topk_kd_loss
from distillguard.distill.train import IGNORE, TrainConfig, kd_example, prune_layers, sft_example, train, _byte_index
from distillguard.errors import ConfigError
from distillguard.models import load_model


def test_topk_kd_loss_known_answers():
    logits = torch.randn(5, 12)
    top = logits.log_softmax(-1).topk(4)
    assert topk_kd_loss(logits, top.indices, top.values).item() == pytest.approx(0.0, abs=1e-6)
    # Two-outcome case by hand: teacher top-1 prob 0.9 on token 0, student has 0.5/0.5 over 2 tokens.
    student = torch.tensor([[0.0, 0.0]])
    kl = topk_kd_loss(student, torch.tensor([[0]]), torch.tensor([[math.log(0.9)]]))
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    # Padded alternatives (-inf) contribute nothing; the mask selects positions.
    padded = topk_kd_loss(student, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.9), float("-inf")]]))
    assert padded.item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([False])
    assert topk_kd_loss(student, torch.tensor([[0]]), torch.tensor([[0.0]]), mask).item() == 0.0


def test_sft_loss_mask_covers_exactly_the_answer_and_its_end():
    lm = load_model("tiny")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    ex = sft_example(lm, messages, "four", max_length=512)
    labeled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert lm.tokenizer.decode(labeled) == "four<|im_end|>"
    prompt = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]
    assert lm.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert sft_example(lm, messages, "four", max_length=len(lm.chat_ids(messages))) is None


def test_prune_keeps_evenly_spaced_layers_and_generates():
    lm = load_model("tiny:layers=6")
    small = prune_layers(lm, 3)
    assert small.model.config.num_hidden_layers == 3
    kept = [id(layer) for layer in small.model.model.layers]
    assert len(set(kept)) == 3
    assert torch.equal(small.model.model.layers[0].mlp.up_proj.weight, lm.model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(small.model.model.layers[2].mlp.up_proj.weight, lm.model.model.layers[5].mlp.up_proj.weight)
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    out = small.model.generate(ids, max_new_tokens=5, do_sample=False)  # the KV cache indexes layers right
    assert out.shape[1] == ids.shape[1] + 5 or int(out[0, -1]) in small.eos_token_ids
    with pytest.raises(ConfigError, match="keep between"):
        prune_layers(lm, 7)


def _records(lm, n=24):
    rows = []
    for i in range(n):
        answer = f"The answer to question {i} is {i * 7}."
        ids = lm.tokenizer.encode(answer, add_special_tokens=False)
        logprobs = [{"token": chr(t) if t < 128 else "?", "logprob": -0.1, "bytes": list(lm.token_bytes[t]),
                     "top_logprobs": [{"token": "x", "logprob": -0.1, "bytes": list(lm.token_bytes[t])},
                                      {"token": "y", "logprob": -2.5, "bytes": list(lm.token_bytes[(t + 1) % 256])}]}
                    for t in ids]
        rows.append({"id": f"p{i}#0", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}?"}],
                     "response": answer, "logprobs": logprobs})
    return rows


def test_kd_refuses_a_different_tokenizer():
    lm = load_model("tiny")
    entry = {"token": "hello", "logprob": -0.1, "bytes": list(b"hello"), "top_logprobs": []}
    with pytest.raises(ConfigError, match="tokenizer"):
        kd_example(lm, _byte_index(lm), [{"role": "user", "content": "q"}], [entry], 512, 1)


@pytest.mark.parametrize("loss", ["sft", "topk-kd"])
def test_training_lowers_the_loss_and_saves_a_loadable_student(tmp_path, loss):
    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    summary = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "student"), student="tiny",
                                loss=loss, epochs=6, lr=3e-3, batch_size=8, seed=0))
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 18 and losses[-1] < losses[0] * 0.8, losses
    student = load_model(str(tmp_path / "student"))
    assert student.context_length == 512
    assert json.loads((tmp_path / "student" / "train_summary.json").read_text())["loss"] == loss


def test_eval_reports_teacher_floor_and_student_agreement():
    from distillguard.distill.evaluate import evaluate

    teacher = load_model("tiny")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    same = evaluate(teacher, load_model("tiny"), prompts, max_new_tokens=12)
    assert same.student.rouge_l == pytest.approx(1.0) and same.student.exact_match == 1.0
    assert same.student.nll == pytest.approx(same.teacher.nll, rel=1e-5)
    other = evaluate(teacher, load_model("tiny:seed=7"), prompts, max_new_tokens=12, baseline=load_model("tiny:seed=8"))
    assert other.student.nll > other.teacher.nll and other.student.exact_match < 1.0
    assert other.gap_closed is not None
