"""Student training: loss masks, the sparse KD loss, pruned students, and short real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillguard.distill.curate import save_dataset
from distillguard.distill.losses import generalized_jsd_loss, topk_kd_loss
from distillguard.distill.train import (
    IGNORE,
    TrainConfig,
    _byte_index,
    block_influence,
    collate,
    kd_example,
    load_student,
    prune_layers,
    run_fingerprint,
    sft_example,
    train,
)
from distillguard.errors import ConfigError
from distillguard.models import load_model
from distillguard.serve.process import distillguard_command


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
    padded = topk_kd_loss(
        student, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.9), float("-inf")]])
    )
    assert padded.item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([False])
    assert topk_kd_loss(student, torch.tensor([[0]]), torch.tensor([[0.0]]), mask).item() == 0.0


def test_generalized_jsd_known_answers_and_agrees_with_trl():
    logits = torch.randn(6, 10)
    for beta in (0.0, 0.3, 0.5, 1.0):  # equal inputs: 0
        assert generalized_jsd_loss(logits, logits.clone(), beta=beta).item() == pytest.approx(
            0.0, abs=1e-6
        )
    # Two outcomes by hand: teacher P = (0.9, 0.1), student Q = (0.5, 0.5).
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    t_logits, s_logits = p.log()[None], q.log()[None]

    def kl(a, b):
        return float((a * (a / b).log()).sum())

    assert generalized_jsd_loss(s_logits, t_logits, beta=0.0).item() == pytest.approx(
        kl(p, q), rel=1e-5
    )
    assert generalized_jsd_loss(s_logits, t_logits, beta=1.0).item() == pytest.approx(
        kl(q, p), rel=1e-5
    )
    m = 0.5 * p + 0.5 * q
    assert generalized_jsd_loss(s_logits, t_logits, beta=0.5).item() == pytest.approx(
        0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5
    )
    # The mask selects positions; none selected gives 0 (with a gradient path).
    both = torch.stack([s_logits[0], t_logits[0]])
    mask = torch.tensor([True, False])
    assert generalized_jsd_loss(
        both, torch.stack([t_logits[0], t_logits[0]]), beta=0.0, mask=mask
    ).item() == pytest.approx(kl(p, q), rel=1e-5)
    assert generalized_jsd_loss(both, both, mask=torch.tensor([False, False])).item() == 0.0
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(both, both, beta=1.5)
    # Same numbers as TRL's GKDTrainer.generalized_jsd_loss (the reference implementation).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that its API may change
        from trl.experimental.gkd import GKDTrainer
    s, t = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
    for beta in (0.0, 0.5, 0.9, 1.0):
        ref = GKDTrainer.generalized_jsd_loss(s, t, beta=beta)
        assert generalized_jsd_loss(s, t, beta=beta).item() == pytest.approx(
            ref.item() / 5, rel=1e-4
        )


def test_sft_loss_mask_covers_exactly_the_answer_and_its_end():
    lm = load_model("tiny")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    ex = sft_example(lm, messages, "four", max_length=512)
    labeled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert lm.tokenizer.decode(labeled) == "four<|im_end|>"
    prompt = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]
    assert lm.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert sft_example(lm, messages, "four", max_length=len(lm.chat_ids(messages))) is None
    # an answer cut at max_tokens did not end there: the same tokens, no end-of-turn to learn
    cut = sft_example(lm, messages, "four", max_length=512, capped=True)
    assert (
        lm.tokenizer.decode([t for t, lab in zip(cut["input_ids"], cut["labels"]) if lab != IGNORE])
        == "four"
    )
    assert cut["input_ids"] == ex["input_ids"][:-1]


def test_prune_keeps_evenly_spaced_layers_and_generates():
    lm = load_model("tiny:layers=6")
    small = prune_layers(lm, 3, "even")
    assert small.model.config.num_hidden_layers == 3
    kept = [id(layer) for layer in small.model.model.layers]
    assert len(set(kept)) == 3
    assert torch.equal(
        small.model.model.layers[0].mlp.up_proj.weight, lm.model.model.layers[0].mlp.up_proj.weight
    )
    assert torch.equal(
        small.model.model.layers[2].mlp.up_proj.weight, lm.model.model.layers[5].mlp.up_proj.weight
    )
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    out = small.model.generate(
        ids, max_new_tokens=5, do_sample=False
    )  # the KV cache indexes layers right
    assert out.shape[1] == ids.shape[1] + 5 or int(out[0, -1]) in small.eos_token_ids
    with pytest.raises(ConfigError, match="keep between"):
        prune_layers(lm, 7)
    with pytest.raises(ConfigError, match="unknown layer choice"):
        prune_layers(lm, 3, "random")


def test_prune_by_influence_drops_the_layer_that_does_nothing():
    """A layer whose output projections are zero leaves the residual stream as it was (Block
    Influence 0): influence pruning drops it, where evenly spaced layers would keep it."""
    lm = load_model("tiny:layers=6")
    idle = lm.model.model.layers[2]
    with torch.no_grad():
        idle.self_attn.o_proj.weight.zero_()
        idle.mlp.down_proj.weight.zero_()
    pairs = [
        ("What is the capital of France?", "Paris is the capital and largest city of France.")
    ] * 2
    influence = block_influence(lm, pairs)
    assert float(influence[2]) < 1e-6 < float(influence[1:5].max())
    by_influence = prune_layers(lm, 5, pairs=pairs)
    assert [id(x) for x in by_influence.model.model.layers] != [
        id(x) for x in lm.model.model.layers
    ]
    assert not any(
        torch.equal(x.mlp.down_proj.weight, idle.mlp.down_proj.weight)
        for x in by_influence.model.model.layers
    )
    evenly = prune_layers(lm, 5, "even")  # layers 0, 1, 2, 4, 5
    assert any(
        torch.equal(x.mlp.down_proj.weight, idle.mlp.down_proj.weight)
        for x in evenly.model.model.layers
    )
    # The untrained student made by influence is the same model minus an identity: same logits.
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    with torch.inference_mode():
        assert torch.allclose(by_influence.model(ids).logits, lm.model(ids).logits, atol=1e-5)
    with pytest.raises(ConfigError, match="prune:K"):
        load_student("prune:5:even:x", lm)
    assert load_student("prune:5:even", lm).model.config.num_hidden_layers == 5


def test_mlp_width_pruning_drops_the_neurons_that_never_fire(tmp_path):
    """Neurons whose gate rows are zero never activate (importance 0): ``prune:K:mlpW`` keeps the
    others, so the width-pruned student has the depth-pruned one's logits, saves and reloads."""
    from transformers import AutoModelForCausalLM

    from distillguard.distill.train import mlp_importance, parse_prune_spec

    lm = load_model("tiny:layers=4")
    full = lm.model.config.intermediate_size
    idle = torch.arange(0, full, 2)  # every other neuron
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.mlp.gate_proj.weight[idle] = 0
    pairs = [
        ("What is the capital of France?", "Paris is the capital and largest city of France.")
    ] * 2
    importance = mlp_importance(lm, pairs)
    assert all(float(s[idle].max()) == 0 < float(s[1::2].min()) for s in importance)
    deep = load_student("prune:3:even", lm)
    narrow = load_student(f"prune:3:even:mlp{full // 2}", lm)
    assert narrow.model.config.intermediate_size == full // 2 and narrow.spec.endswith(
        f":mlp{full // 2}"
    )
    assert all(x.mlp.down_proj.weight.shape[1] == full // 2 for x in narrow.model.model.layers)
    assert lm.model.config.intermediate_size == full  # the teacher is not touched
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    with torch.inference_mode():
        assert torch.allclose(narrow.model(ids).logits, deep.model(ids).logits, atol=1e-5)
        # a quarter of the width must cut live neurons: the logits move
        quarter = load_student(f"prune:3:even:mlp{full // 4}", lm)
        assert not torch.allclose(quarter.model(ids).logits, deep.model(ids).logits, atol=1e-3)
    narrow.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # the config's width rebuilds the shapes
    with torch.inference_mode():
        assert torch.allclose(again(ids).logits, narrow.model(ids).logits, atol=1e-5)
    assert parse_prune_spec("prune:15:mlp768") == (15, "influence", 768)
    assert parse_prune_spec("prune:15:block:mlp768") == (15, "block", 768)
    for bad in ("prune:3:mlp", "prune:3:mlp8:even", "prune:3:even:mlp8:x", "prune:x:mlp8"):
        with pytest.raises(ConfigError, match="prune:K"):
            parse_prune_spec(bad)
    with pytest.raises(ConfigError, match="keep between 1 and"):
        load_student(f"prune:3:even:mlp{full + 1}", lm)
    with pytest.raises(ConfigError, match="prune:K"):
        TrainConfig(data="d", out="o", student="prune:11:mlp")


def test_prune_by_block_drops_the_contiguous_block_that_does_nothing():
    """Two adjacent layers with zero output projections leave the stream as it was: their block's
    angular distance is 0, the smallest of all, and ``block`` pruning drops exactly them, so the
    untrained student has the full model's logits."""
    from distillguard.distill.train import block_distance

    lm = load_model("tiny:layers=6")
    with torch.no_grad():
        for i in (3, 4):
            lm.model.model.layers[i].self_attn.o_proj.weight.zero_()
            lm.model.model.layers[i].mlp.down_proj.weight.zero_()
    pairs = [
        ("What is the capital of France?", "Paris is the capital and largest city of France.")
    ] * 2
    distance = block_distance(lm, 2, pairs)
    assert len(distance) == 5 and int(distance.argmin()) == 3
    assert float(distance[3]) < 1e-3 < float(distance[[0, 1, 2, 4]].min())
    student = prune_layers(lm, 4, "block", pairs=pairs)
    kept = [id(x) for x in student.model.model.layers]
    originals = [lm.model.model.layers[i] for i in (0, 1, 2, 5)]
    assert (
        all(
            torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
            for a, b in zip(student.model.model.layers, originals)
        )
        and len(kept) == 4
    )
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": "hi"}])])
    with torch.inference_mode():
        assert torch.allclose(student.model(ids).logits, lm.model(ids).logits, atol=1e-5)
    assert load_student("prune:4:block", lm).model.config.num_hidden_layers == 4


def test_sparse_logits_are_the_full_logits_at_the_answer():
    """The output layer on the answer positions only gives the same logits and the same SFT loss."""
    from distillguard.distill.train import answer_logits, shifted

    lm = load_model("tiny:layers=2")
    batch = collate(
        [
            sft_example(lm, [{"role": "user", "content": "q" * n}], "an answer " * n, 512)
            for n in (1, 5, 9)
        ],
        lm.tokenizer.pad_token_id,
    )
    select = shifted(batch["labels"])
    assert select.sum() == (batch["labels"] != IGNORE).sum()  # one prediction per labelled token
    with torch.no_grad():
        full = lm.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        sparse = answer_logits(lm.model, batch["input_ids"], batch["attention_mask"], select)
    assert sparse.shape == (int(select.sum()), full.logits.shape[-1])
    assert torch.allclose(sparse, full.logits[select], atol=1e-5)
    ce = torch.nn.functional.cross_entropy(sparse, batch["labels"][:, 1:][select[:, :-1]])
    assert ce.item() == pytest.approx(full.loss.item(), rel=1e-5)  # the model's own causal-LM loss


def _records(lm, n=24):
    rows = []
    for i in range(n):
        answer = f"The answer to question {i} is {i * 7}."
        ids = lm.tokenizer.encode(answer, add_special_tokens=False)
        logprobs = [
            {
                "token": chr(t) if t < 128 else "?",
                "logprob": -0.1,
                "bytes": list(lm.token_bytes[t]),
                "top_logprobs": [
                    {"token": "x", "logprob": -0.1, "bytes": list(lm.token_bytes[t])},
                    {"token": "y", "logprob": -2.5, "bytes": list(lm.token_bytes[(t + 1) % 256])},
                ],
            }
            for t in ids
        ]
        rows.append(
            {
                "id": f"p{i}#0",
                "prompt_id": f"p{i}",
                "messages": [{"role": "user", "content": f"question {i}?"}],
                "response": answer,
                "logprobs": logprobs,
            }
        )
    return rows


def test_kd_refuses_a_different_tokenizer():
    lm = load_model("tiny")
    entry = {"token": "hello", "logprob": -0.1, "bytes": list(b"hello"), "top_logprobs": []}
    with pytest.raises(ConfigError, match="tokenizer"):
        kd_example(lm, _byte_index(lm), [{"role": "user", "content": "q"}], [entry], 512, 1)
    # The end-of-turn token among the top-k alternatives is the student's special token, not an error.
    end = {"token": "<|im_end|>", "logprob": -1.0, "bytes": list(b"<|im_end|>")}
    ok = kd_example(
        lm,
        _byte_index(lm),
        [{"role": "user", "content": "q"}],
        [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [end]}],
        512,
        1,
    )
    assert ok["topk_ids"] == [[lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]]


def test_full_logit_kd_refuses_a_different_tokenizer(tmp_path):
    lm = load_model("tiny")
    save_dataset(_records(lm, 4), [], tmp_path / "data")
    lm.tokenizer.add_tokens(["<extra-token>"])  # a student whose vocabulary is not the teacher's
    lm.model.resize_token_embeddings(len(lm.tokenizer))
    lm.model.save_pretrained(tmp_path / "other")
    lm.tokenizer.save_pretrained(tmp_path / "other")
    for loss in ("kd", "gkd"):
        with pytest.raises(
            ConfigError, match=f"--loss {loss} needs the teacher's tokenizer.*--loss sft"
        ):
            train(
                TrainConfig(
                    data=str(tmp_path / "data"),
                    out=str(tmp_path / "s"),
                    student=str(tmp_path / "other"),
                    teacher="tiny",
                    loss=loss,
                )
            )
    with pytest.raises(ConfigError, match="--beta"):
        TrainConfig(data="d", out="o", loss="kd", beta=2.0)
    with pytest.raises(ConfigError, match="use one of auto, sft, topk-kd, kd, gkd"):
        TrainConfig(data="d", out="o", loss="distill")
    # settings that would train nothing, or crash deep inside the Trainer, are refused up front
    for bad, match in [
        ({"epochs": -1}, "--epochs -1"),
        ({"lr": 0.0}, "--lr 0.0"),
        ({"batch_size": 0}, "--batch-size 0"),
        ({"grad_accum": 0}, "--grad-accum 0"),
        ({"max_train": 0}, "--max-train 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig(data="d", out="o", **bad)


def test_on_policy_batch_labels_the_students_answer_up_to_its_end():
    from transformers import TrainingArguments

    from distillguard.distill.train import LogitKDTrainer

    lm = load_model("tiny")
    messages = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a longer question"}],
    ]
    batch = collate(
        [sft_example(lm, m, "ok", 512) for m in messages], lm.tokenizer.pad_token_id, prompts=True
    )
    assert batch["prompt_mask"][0].tolist().count(0) == len(lm.chat_ids(messages[1])) - len(
        lm.chat_ids(messages[0])
    )
    trainer = LogitKDTrainer(
        teacher=load_model("tiny:seed=1").model,
        beta=0.5,
        lmbda=1.0,
        vocab=len(lm.tokenizer),
        eos_token_ids=sorted(lm.eos_token_ids),
        pad_token_id=lm.tokenizer.pad_token_id,
        max_new_tokens=12,
        temperature=1.0,
        model=lm.model,
        args=TrainingArguments(output_dir="/tmp/unused", report_to=[], use_cpu=True),
        train_dataset=[1],
    )
    for _ in range(3):
        out = trainer.student_answers(lm.model, batch)
        width = batch["prompt_ids"].shape[1]
        assert (out["labels"][:, :width] == IGNORE).all()
        for row, labels, mask in zip(out["input_ids"], out["labels"], out["attention_mask"]):
            answer = row[width:].tolist()
            cut = next((i + 1 for i, t in enumerate(answer) if t in lm.eos_token_ids), len(answer))
            assert (
                labels[width : width + cut].tolist() == answer[:cut]
            )  # the answer and its end are learned
            assert (labels[width + cut :] == IGNORE).all() and mask[
                width + cut :
            ].sum() == 0  # nothing after it


def test_unlikelihood_candidates_and_loss_known_answers():
    from distillguard.distill.losses import previous_token_candidates, unlikelihood_loss

    cands = previous_token_candidates([torch.tensor([5, 7, 5, 9]), torch.tensor([1, 1])], 10)
    # each position's negatives: what its answer wrote before it, less its own token; nothing across answers
    assert [torch.nonzero(row).flatten().tolist() for row in cands] == [
        [],
        [5],
        [7],
        [5, 7],
        [],
        [],
    ]
    uniform = torch.zeros(6, 10)  # p = 0.1 everywhere: each candidate costs -log(0.9)
    assert unlikelihood_loss(uniform, cands).item() == pytest.approx(
        -4 / 6 * math.log(0.9), rel=1e-6
    )
    confident = torch.full((1, 10), -30.0)
    confident[0, 5] = 30.0  # all the mass on a token already written: the term is large
    assert unlikelihood_loss(confident, cands[1:2]).item() > 10
    assert unlikelihood_loss(confident, cands[2:3]).item() == pytest.approx(0.0, abs=1e-6)
    assert unlikelihood_loss(uniform[:0], cands[:0]).item() == 0.0


@pytest.mark.parametrize("loss", ["sft", "topk-kd"])
def test_unlikelihood_is_added_at_the_answer_positions_and_lowers_the_mass_on_repeats(
    tmp_path, loss
):
    from transformers import TrainingArguments

    from distillguard.distill.losses import previous_token_candidates, unlikelihood_loss
    from distillguard.distill.train import KDTrainer, SFTTrainer, answer_logits, shifted

    lm = load_model("tiny")
    rows = _records(lm)
    examples = [
        kd_example(lm, _byte_index(lm), r["messages"], r["logprobs"], 512, 2)
        if loss == "topk-kd"
        else sft_example(lm, r["messages"], r["response"], 512)
        for r in rows[:3]
    ]
    batch = collate(examples, lm.tokenizer.pad_token_id)
    select = batch["kd_mask"] if loss == "topk-kd" else shifted(batch["labels"])
    with torch.no_grad():
        logits = answer_logits(lm.model, batch["input_ids"], batch["attention_mask"], select)
    targets = batch["input_ids"].roll(-1, dims=1)[select]
    answers = targets.split(select.sum(dim=1).tolist())
    assert all(
        a.tolist() == e["input_ids"][len(e["input_ids"]) - len(a) - (loss == "topk-kd") :][: len(a)]
        for a, e in zip(answers, examples)
    )  # each sequence's own answer tokens, in order
    ul = unlikelihood_loss(logits, previous_token_candidates(answers, logits.shape[-1])).item()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cls = KDTrainer if loss == "topk-kd" else SFTTrainer
    with torch.no_grad():
        plain, plus = (
            cls(model=lm.model, args=args, train_dataset=[1], unlikelihood=w)
            .loss_of(lm.model, batch, False)
            .item()
            for w in (0.0, 2.0)
        )
    assert ul > 0 and plus - plain == pytest.approx(2.0 * ul, rel=1e-4)

    # Trained with it, a student puts less of its mass on what the answer already wrote.
    save_dataset(rows, [], tmp_path / "data")

    def mass_on_repeats(student_dir):
        student = load_model(str(student_dir), device="cpu")
        with torch.no_grad():
            probs = answer_logits(
                student.model, batch["input_ids"], batch["attention_mask"], select
            ).softmax(-1)
        return (probs * previous_token_candidates(answers, probs.shape[-1])).sum(-1).mean().item()

    masses = []
    for w in (0.0, 1.0):
        train(
            TrainConfig(
                data=str(tmp_path / "data"),
                out=str(tmp_path / f"ul{w}"),
                student="tiny",
                teacher="tiny",
                loss=loss,
                epochs=4,
                lr=3e-3,
                batch_size=8,
                seed=0,
                unlikelihood=w,
            )
        )
        masses.append(mass_on_repeats(tmp_path / f"ul{w}"))
    assert masses[1] < 0.9 * masses[0], masses
    with pytest.raises(ConfigError, match="not kd"):
        TrainConfig(data="d", out="o", loss="kd", unlikelihood=1.0)
    with pytest.raises(ConfigError, match="unlikelihood -1"):
        TrainConfig(data="d", out="o", unlikelihood=-1)
    # the default: 1 where it applies (the measured setting), 0 for the local-teacher losses; a run
    # with the default is the same run as one that spells it out
    assert TrainConfig(data="d", out="o").unlikelihood_weight == 1.0
    assert TrainConfig(data="d", out="o", loss="kd").unlikelihood_weight == 0.0
    examples = [{"input_ids": [1, 2, 3]}]
    assert run_fingerprint(TrainConfig(data="d", out="o"), examples) == run_fingerprint(
        TrainConfig(data="d", out="o", unlikelihood=1.0), examples
    )


def test_ce_weight_mixes_cross_entropy_on_the_teachers_tokens_into_topk_kd(tmp_path):
    """ce_weight 1 is the SFT loss on the answer tokens (not their end: top-k KD has no top-k
    there), 0 the top-k KL alone, and anything between the straight mix of the two."""
    from transformers import TrainingArguments

    from distillguard.distill.train import KDTrainer, SFTTrainer, answer_logits, shifted

    lm = load_model("tiny")
    rows = _records(lm, 3)
    examples = [kd_example(lm, _byte_index(lm), r["messages"], r["logprobs"], 512, 2) for r in rows]
    batch = collate(examples, lm.tokenizer.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)

    def loss(w):
        trainer = KDTrainer(model=lm.model, args=args, train_dataset=[1], ce_weight=w)
        with torch.no_grad():
            return trainer.loss_of(lm.model, batch, return_outputs=False).item()

    kl, ce, half = loss(0.0), loss(1.0), loss(0.5)
    # SFT without the end-of-turn step: cross-entropy of the answer tokens, which are the teacher's own
    select = shifted(batch["labels"])
    select[torch.arange(len(examples)), [len(e["input_ids"]) - 2 for e in examples]] = False
    assert select.sum() == batch["kd_mask"].sum()
    with torch.no_grad():
        logits = answer_logits(lm.model, batch["input_ids"], batch["attention_mask"], select)
    sft = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:][select[:, :-1]]).item()
    assert ce == pytest.approx(sft, rel=1e-5)
    assert kl != pytest.approx(ce, rel=1e-2)
    assert half == pytest.approx((kl + ce) / 2, rel=1e-5)
    with torch.no_grad():  # and the SFT trainer's own loss, end included, is another number
        assert SFTTrainer(model=lm.model, args=args, train_dataset=[1]).loss_of(
            lm.model, batch, False
        ).item() != pytest.approx(ce, rel=1e-4)
    with pytest.raises(ConfigError, match="ce-weight 1.5"):
        TrainConfig(data="d", out="o", ce_weight=1.5)
    for loss in ("kd", "gkd", "sft"):  # mixing is for top-k KD; SFT is all cross-entropy already
        with pytest.raises(ConfigError, match=f"not {loss}"):
            TrainConfig(data="d", out="o", loss=loss, ce_weight=0.3)
    # At its default the setting leaves a run's fingerprint what it was before the setting existed
    # (this digest is the one the code before ce_weight computed), so older checkpoints still resume.
    examples = [{"input_ids": [1, 2, 3]}]
    base = TrainConfig(data="d", out="o", precision="bf16", student="prune:11", unlikelihood=0.0)
    assert (
        run_fingerprint(base, examples)
        == "7aad3a1f06e3e0e29446de14afe8fd4b682c5c242c52ea35855bade7c9b4ccc1"
    )
    assert run_fingerprint(base.replace(ce_weight=0.5), examples) != run_fingerprint(base, examples)


@pytest.mark.parametrize("loss", ["sft", "topk-kd", "kd", "gkd"])
def test_training_lowers_the_loss_and_saves_a_loadable_student(tmp_path, loss):
    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    summary = train(
        TrainConfig(
            data=str(tmp_path / "data"),
            out=str(tmp_path / "student"),
            student="tiny",
            teacher="tiny:layers=3,seed=5",
            loss=loss,
            epochs=6,
            lr=3e-3,
            batch_size=8,
            seed=0,
            lmbda=0.5,
            gen_max_new_tokens=16,
        )
    )
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 18 and losses[-1] < losses[0] * 0.8, losses
    if loss == "gkd":
        assert (
            0 < summary["on_policy_batches"] < 18
        )  # about half the batches were the student's own answers
    student = load_model(str(tmp_path / "student"))
    assert student.context_length == 512
    assert json.loads((tmp_path / "student" / "train_summary.json").read_text())["loss"] == loss


def test_bf16_mixed_precision_trains_and_keeps_float32_weights(tmp_path):
    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train(
            TrainConfig(
                data=str(tmp_path / "data"),
                out=str(tmp_path / precision),
                student="tiny",
                teacher="tiny",
                loss="topk-kd",
                epochs=6,
                lr=3e-3,
                batch_size=8,
                seed=0,
                precision=precision,
            )
        )
    fp32, bf16 = ([h["loss"] for h in runs[p]["history"]] for p in ("fp32", "bf16"))
    assert bf16[-1] < bf16[0] * 0.8, bf16
    assert bf16 != fp32  # the same run but for the setting: autocast did change the arithmetic
    assert runs["bf16"]["precision"] == "bf16"
    saved = load_model(str(tmp_path / "bf16"), device="cpu")
    assert {p.dtype for p in saved.model.parameters()} == {
        torch.float32
    }  # master weights stay float32


def test_precision_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        TrainConfig(data="d", out="o", precision="fp8")
    if not torch.cuda.is_available():  # CI: always; on a GPU machine TF32 is allowed
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), precision="tf32"))


def test_train_takes_a_student_built_by_the_caller(tmp_path):
    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    built = load_model(
        "tiny:layers=1,seed=3", device="cpu"
    )  # e.g. a student whose layers or head were changed
    config = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "s"),
        student="tiny",
        teacher="tiny",
        loss="sft",
        epochs=1,
        batch_size=8,
        seed=0,
    )
    summary = train(config, student=built)
    assert summary["student_given"] and summary["steps"] == 3
    assert (
        load_model(str(tmp_path / "s"), device="cpu").model.config.num_hidden_layers == 1
    )  # not config.student's 2
    # A checkpoint is resumed only by the same starting weights: the fingerprint reads them.
    examples = [{"input_ids": [1, 2, 3]}]
    other = load_model("tiny:layers=1,seed=4", device="cpu")
    prints = {
        run_fingerprint(config, examples),
        run_fingerprint(config, examples, other.model),
        run_fingerprint(config, examples, load_model("tiny:layers=1,seed=4", device="cpu").model),
    }
    assert len(prints) == 2


def test_auto_loss_is_topk_kd_where_the_data_allows_it(tmp_path):
    lm = load_model("tiny")
    rows = _records(lm, 4)
    save_dataset(rows, [], tmp_path / "with")
    save_dataset([{**r, "logprobs": None} for r in rows], [], tmp_path / "without")
    common = dict(student="tiny", teacher="tiny", epochs=1, batch_size=4, seed=0)
    assert TrainConfig(data="d", out="o").loss == "auto"
    summary = train(TrainConfig(data=str(tmp_path / "with"), out=str(tmp_path / "a"), **common))
    assert summary["loss"] == "topk-kd" and summary["requested_loss"] == "auto"
    summary = train(TrainConfig(data=str(tmp_path / "without"), out=str(tmp_path / "b"), **common))
    assert summary["loss"] == "sft"
    with pytest.raises(ConfigError, match="needs harvested logprobs"):
        train(
            TrainConfig(
                data=str(tmp_path / "without"), out=str(tmp_path / "c"), loss="topk-kd", **common
            )
        )


def test_eval_many_students_share_one_teacher_run(tmp_path):
    from distillguard.distill.evaluate import evaluate, evaluate_many, learning_curve_plot

    teacher = load_model("tiny")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    students = [load_model("tiny:seed=7"), load_model("tiny")]
    seen = []
    reports = evaluate_many(
        teacher, students, prompts, max_new_tokens=8, on_progress=lambda *a: seen.append(a)
    )
    # the progress runs over every pass, prompt by prompt, to its total: teacher 2 passes, each student 3
    assert seen[-1][1:] == (3 * (2 + 3 * 2),) * 2 and [d for _, d, _ in seen] == sorted(
        d for _, d, _ in seen
    )
    assert {w for w, _, _ in seen} >= {"teacher answers", "teacher NLL", "tiny: under the teacher"}
    assert reports[1].student.nll == pytest.approx(
        reports[1].teacher.nll, rel=1e-5
    )  # the teacher as a student
    assert reports[0].student.nll == pytest.approx(
        evaluate(teacher, students[0], prompts, max_new_tokens=8).student.nll
    )
    learning_curve_plot(reports, [100, 400], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_eval_reports_teacher_floor_and_student_agreement():
    from distillguard.distill.evaluate import evaluate

    teacher = load_model("tiny")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    same = evaluate(teacher, load_model("tiny"), prompts, max_new_tokens=12)
    assert same.student.rouge_l == pytest.approx(1.0) and same.student.exact_match == 1.0
    assert same.student.nll == pytest.approx(same.teacher.nll, rel=1e-5)
    other = evaluate(
        teacher,
        load_model("tiny:seed=7"),
        prompts,
        max_new_tokens=12,
        baseline=load_model("tiny:seed=8"),
    )
    assert other.student.nll > other.teacher.nll and other.student.exact_match < 1.0
    assert other.gap_closed is not None
    # reproducible: which prompts exactly, and what scored them; strict JSON (the baseline's speed is
    # not measured: None, where it was NaN, which json.loads in other languages rejects)
    from distillguard.distill.evaluate import prompts_digest

    assert (
        same.prompts_sha256
        == other.prompts_sha256
        == prompts_digest(prompts)
        != prompts_digest(prompts[:3])
    )
    assert set(same.versions) >= {"distillguard", "torch", "transformers"}
    strict = json.loads(json.dumps(other.to_dict(), allow_nan=False))
    assert strict["baseline"]["tokens_per_s"] is None and strict["gap_closed"] == other.gap_closed
    # coherence: the teacher as its own student scores the same; another model's answers are less
    # plausible to the teacher than its own greedy answers
    assert same.student.nll_under_teacher == pytest.approx(same.teacher.nll_under_teacher, rel=1e-5)
    assert same.student.rep4 == same.teacher.rep4
    assert other.student.nll_under_teacher > other.teacher.nll_under_teacher
    with pytest.raises(ConfigError, match="no prompts to evaluate on"):  # not a table of zeros
        evaluate(teacher, load_model("tiny"), [], max_new_tokens=12)
    with pytest.raises(ConfigError, match="--max-new-tokens 0"):  # not transformers' traceback
        evaluate(teacher, load_model("tiny"), prompts, max_new_tokens=0)


def test_repeated_ngrams_counts_loops_within_an_answer_only():
    from distillguard.distill.evaluate import repeated_ngrams

    assert repeated_ngrams([[1, 2, 3, 4, 5, 6]]) == 0.0
    assert repeated_ngrams([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(
        1 / 5
    )  # (1,2,3,4) again at the end
    assert repeated_ngrams([[7] * 10]) == pytest.approx(
        6 / 7
    )  # a loop: every 4-gram but the first repeats
    assert repeated_ngrams([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.0  # across answers is not repetition
    assert repeated_ngrams([[1, 2], []]) == 0.0


def test_distinct_prompts_evaluates_a_prompt_once_however_many_answers_it_has():
    from distillguard.distill.evaluate import distinct_prompts

    q = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    rows = [
        {"messages": q[0], "response": "a"},
        {"messages": q[1], "response": "b"},
        {"messages": q[0], "response": "c"},
        {"messages": q[2], "response": "d"},
    ]
    assert distinct_prompts(rows) == [q[0], q[1], q[2]]


def test_greedy_answers_pass_decoding_options_to_generate():
    from distillguard.distill.evaluate import greedy_answers, repeated_ngrams

    lm = load_model("tiny")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    plain, _ = greedy_answers(lm, prompts, 24)
    blocked, _ = greedy_answers(lm, prompts, 24, no_repeat_ngram_size=2)
    assert repeated_ngrams(plain, n=2) > 0  # the tiny random model loops under greedy decoding
    assert repeated_ngrams(blocked, n=2) == 0.0


def test_cli_trains_on_policy_end_to_end(tmp_path):
    from tests.servers import run_cli

    lm = load_model("tiny")
    # two answers to each of 4 prompts (the API's n=2): 8 examples, 4 teacher queries
    records = [
        {
            **r,
            "prompt_id": f"p{i // 2}",
            "messages": [{"role": "user", "content": f"question {i // 2}?"}],
        }
        for i, r in enumerate(_records(lm, 8))
    ]
    save_dataset(records, [], tmp_path / "data")
    res = run_cli(
        "distill",
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "student"),
        "--student",
        "tiny",
        "--teacher",
        "tiny:seed=3",
        "--loss",
        "gkd",
        "--lmbda",
        "1",
        "--gen-max-new-tokens",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # stdout is the JSON summary alone: not the Trainer's {'train_runtime': ...} dicts
    assert len(res.stdout.strip().splitlines()) == 1, res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (
        summary["loss"] == "gkd"
        and summary["beta"] == 0.5
        and summary["on_policy_batches"] == summary["steps"] == 2
    )
    assert summary["examples"] == 8 and summary["queries"] == 4
    assert (
        summary["config"]["lmbda"] == 1.0
        and summary["config"]["batch_size"] == 4
        and len(summary["run_fingerprint"]) == 64
    )
    assert summary["versions"]["torch"]
    weights = (tmp_path / "student" / "model.safetensors").stat().st_mtime_ns
    res = run_cli(
        "distill",
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "student"),
        "--student",
        "tiny",
        "--teacher",
        "tiny:seed=3",
        "--loss",
        "gkd",
        "--lmbda",
        "1",
        "--gen-max-new-tokens",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    )  # the same command again
    assert res.returncode == 0 and "already holds this run's student" in " ".join(
        res.stderr.split()
    )
    assert json.loads(res.stdout.strip().splitlines()[-1])["already_trained"] is True
    assert (
        tmp_path / "student" / "model.safetensors"
    ).stat().st_mtime_ns == weights  # not trained again
    # fewer steps than the logging interval: the run's mean loss, not NaN (which is not JSON)
    assert summary["final_loss"] == summary["train_loss"] > 0
    res = run_cli(
        "distill",
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "never"),
        "--student",
        "tiny",
        "--teacher",
        "tiny:seed=3",
        "--batch-size",
        "0",
    )
    assert (
        res.returncode == 2
        and "--batch-size 0: use 1 or more" in res.stderr
        and "Traceback" not in res.stderr
    )
    assert load_model(str(tmp_path / "student")).model.config.num_hidden_layers == 2
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(json.dumps({"prompt": f"held-out question {i}?"}) + "\n" for i in range(3))
    )
    res = run_cli(
        "distill",
        "eval",
        "--student",
        str(tmp_path / "student"),
        "--student",
        str(tmp_path / "student"),
        "--teacher",
        "tiny:seed=3",
        "--prompts",
        str(heldout),
        "--max-new-tokens",
        "6",
        "--plot",
        str(tmp_path / "curve.png"),
        timeout=600,  # three tiny models loaded and run on a shared machine
    )
    assert res.returncode == 0, res.stderr[-2000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["queries"] for r in reports] == [4, 4] and reports[0]["student"]["nll"] == reports[1][
        "student"
    ]["nll"]
    assert (
        reports[0]["source"]
        == {
            "prompts": str(heldout),
            "skip": 0,
            "limit": 64,
            "max_prompt_tokens": 1024,
            "over_prompt_cap": 0,
        }
        and reports[0]["prompts_sha256"]
    )
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    res = run_cli(
        "distill",
        "eval",
        "--student",
        "tiny",
        "--teacher",
        "tiny",
        "--prompts",
        str(heldout),
        "--plot",
        str(tmp_path / "x.png"),
    )
    assert res.returncode == 2 and "--plot needs students from `distill train`" in res.stderr


class _Crash(Exception):
    pass


def _weights(path) -> dict:
    return {k: v.clone() for k, v in load_model(str(path)).model.state_dict().items()}


@pytest.mark.parametrize("loss", ["sft", "gkd"])
def test_a_crashed_run_resumes_from_its_last_whole_checkpoint_and_ends_where_an_unbroken_one_does(
    tmp_path, loss
):
    from transformers import TrainerCallback

    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    common = dict(
        data=str(tmp_path / "data"),
        student="tiny",
        teacher="tiny:layers=3,seed=5",
        loss=loss,
        epochs=6,
        lr=3e-3,
        batch_size=8,
        seed=0,
        lmbda=0.5,
        gen_max_new_tokens=8,
    )
    unbroken = train(TrainConfig(out=str(tmp_path / "unbroken"), save_steps=0, **common))
    assert not (tmp_path / "unbroken" / "checkpoints").exists()

    class CrashAtStep12(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 12:
                raise _Crash

    # Checkpoints on the loss log's boundaries (every 5 steps), so the logged means cover the same steps.
    config = TrainConfig(out=str(tmp_path / "resumed"), save_steps=5, **common)
    with pytest.raises(_Crash):
        train(config, callbacks=[CrashAtStep12()])
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert sorted(d.name for d in checkpoints.iterdir()) == [
        "checkpoint-10"
    ]  # step 5's went once 10 was whole
    # A checkpoint cut off while being written (no mark): skipped and removed, not resumed from.
    (checkpoints / "checkpoint-15").mkdir()
    (checkpoints / "checkpoint-15" / "model.safetensors").write_bytes(b"\0" * 10)

    with pytest.raises(ConfigError, match="different training run"):
        train(TrainConfig(out=str(tmp_path / "resumed"), save_steps=5, **{**common, "lr": 1e-3}))
    resumed = train(config)
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == unbroken["steps"] == 18
    assert not checkpoints.exists()  # deleted once the student is saved
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in unbroken["history"]], rel=1e-4
    )
    if loss == "gkd":  # the on-policy draws depend on the step, not on whether the run stopped
        assert resumed["on_policy_batches"] == unbroken["on_policy_batches"] > 0
    a, b = _weights(tmp_path / "unbroken"), _weights(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # The same run again once its student is saved: nothing to do.
    assert train(config, callbacks=[CrashAtStep12()])["already_trained"] is True
    # --no-resume: a crashed run's checkpoint is deleted and training starts over.
    with pytest.raises(_Crash):
        train(
            TrainConfig(out=str(tmp_path / "resumed"), save_steps=5, resume=False, **common),
            callbacks=[CrashAtStep12()],
        )
    again = train(TrainConfig(out=str(tmp_path / "resumed"), save_steps=5, resume=False, **common))
    assert again["resumed_from_step"] == 0 and again["steps"] == 18


def test_sigterm_stops_training_with_a_checkpoint_of_that_step_and_the_rerun_ends_as_an_unbroken_run(
    tmp_path,
):
    """With checkpoints every 100 steps a SIGTERM at step 7 used to lose all 7; now the Trainer saves
    that step and stops, and the rerun ends with an unbroken run's weights."""
    import os
    import signal

    from transformers import TrainerCallback

    from distillguard.errors import IncompleteError

    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    common = dict(
        data=str(tmp_path / "data"),
        student="tiny",
        loss="sft",
        epochs=6,
        lr=3e-3,
        batch_size=8,
        seed=0,
    )
    unbroken = train(TrainConfig(out=str(tmp_path / "unbroken"), save_steps=0, **common))

    class TermAtStep7(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would

    def not_handled(
        signum, frame
    ):  # what the signal does if train() does not take it over: fail, not die
        raise _Crash("SIGTERM reached the test's handler")

    config = TrainConfig(out=str(tmp_path / "stopped"), save_steps=100, **common)
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        with pytest.raises(IncompleteError, match="stopped by SIGTERM after step 7 of 18"):
            train(config, callbacks=[TermAtStep7()])
        assert signal.getsignal(signal.SIGTERM) is not_handled  # train() put the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(d.name for d in checkpoints.iterdir()) == ["checkpoint-7"]
    assert not (
        tmp_path / "stopped" / "config.json"
    ).exists()  # no half-trained student passed off as done
    resumed = train(config)
    assert resumed["resumed_from_step"] == 7 and resumed["steps"] == unbroken["steps"] == 18
    a, b = _weights(tmp_path / "unbroken"), _weights(tmp_path / "stopped")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_train_killed_mid_run_continues_from_its_checkpoint(tmp_path):
    """A real crash: ``kill -9`` of the CLI while it trains, then the same command again."""
    import os
    import signal
    import subprocess
    import time

    from tests.servers import run_cli

    lm = load_model("tiny")
    save_dataset(_records(lm), [], tmp_path / "data")
    args = [
        "distill",
        "train",
        "--data",
        str(tmp_path / "data"),
        "--student",
        "tiny",
        "--teacher",
        "tiny",
        "--loss",
        "sft",
        "--epochs",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--save-steps",
        "3",
    ]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        distillguard_command(*args, "--out", str(out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/checkpoint-*/distillguard_checkpoint.json")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "no checkpoint before the run ended"
        )
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train_summary.json").exists()

    res = run_cli(*args, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] >= 3 and summary["steps"] == 90
    unbroken = train(
        TrainConfig(
            data=str(tmp_path / "data"),
            out=str(tmp_path / "unbroken"),
            student="tiny",
            teacher="tiny",
            loss="sft",
            epochs=30,
            batch_size=8,
            lr=1e-3,
            seed=0,
            save_steps=0,
        )
    )
    assert summary["final_loss"] == pytest.approx(unbroken["final_loss"], rel=1e-4)
    a, b = _weights(tmp_path / "unbroken"), _weights(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
