"""Train a student on curated teacher answers with the Hugging Face Trainer.

Losses:

* ``auto`` (default): ``topk-kd`` when the harvested data carries top-k logprobs in the student's
  vocabulary, ``sft`` otherwise (top-k KD led SFT at every measured point: README);
* ``sft``: cross-entropy on the assistant's tokens only, rendered with the student's chat template;
* ``topk-kd``: sparse KD from the API's top-k logprobs (teacher and student must share a
  tokenizer, checked token by token);
* ``kd``: full-vocabulary KD against a local teacher's logits on the harvested answers
  (generalised JSD, forward KL by default: ``beta=0``);
* ``gkd``: on-policy distillation (Agarwal et al. 2024): with probability ``lmbda`` a batch's
  answers are sampled from the student itself, the local teacher scores every position, and the
  loss is the generalised JSD (``beta=0.5`` by default); otherwise the harvested answers are used.

``kd`` and ``gkd`` need the teacher's exact tokenizer (refused otherwise). Students: any ``load_model`` spec, ``prune:K`` (K
of the teacher's layers, chosen by Block Influence on real text; ``prune:K:block`` drops the
contiguous block that turns the residual stream least, ``prune:K:even`` keeps evenly spaced
layers; a smaller initialisation that keeps its knowledge), and
LoRA adapters through PEFT. Built on ``transformers.Trainer``, so accelerate, FSDP and
DeepSpeed work unchanged on GPUs.

Resumable: every ``save_steps`` optimiser steps a checkpoint (weights, optimiser, scheduler, RNG
states, data position) lands in ``OUT/checkpoints``; rerunning the same command after a crash
continues from the last complete one, refuses one written by a different run (other data or
settings), and deletes them once the student is saved.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from distillguard.distill.evaluate import distinct_prompts, versions
from distillguard.distill.losses import (
    generalized_jsd_loss,
    previous_token_candidates,
    topk_kd_loss,
    unlikelihood_loss,
)
from distillguard.errors import ConfigError, IncompleteError
from distillguard.models import LoadedModel, load_model

IGNORE = -100
LOSSES = ("auto", "sft", "topk-kd", "kd", "gkd")
LOCAL_TEACHER_LOSSES = ("kd", "gkd")  # need the teacher's logits, computed here


PRECISIONS = ("fp32", "bf16", "tf32")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    # 15 of the teacher's 30 layers, their MLPs cut to 896 of 1,536 neurons: 0.46-0.49 of its CPU per token,
    # 0.13-0.22 nats better than 11 whole layers at about the same cost (README, bench/distill_curves.py)
    student: str = "prune:15:mlp896"
    teacher: str = (
        "smollm2"  # what prune:K starts from; also the tokenizer of the harvested logprobs
    )
    loss: str = "auto"  # topk-kd where the data has top-k logprobs the student can read, else sft
    # topk-kd: the share of the loss that is plain cross-entropy on the teacher's own (sampled) tokens,
    # the rest the top-k KL (DistillKit's alpha, the other way round). The API's top-k leaves the
    # rest of the distribution lumped in one tail bucket; the sampled token says where some of it went.
    ce_weight: float = 0.0
    # sft/topk-kd: weight of token-level unlikelihood (Welleck et al. 2019): at each answer position the
    # mass on tokens the answer already wrote, less the one it writes there, is pushed down. None: 1 for
    # sft/topk-kd/auto (from 4,000 queries it took rep4 0.36 -> 0.15 for 0.08 nats; README), 0 for kd/gkd
    unlikelihood: float | None = None
    lora: bool = False
    lora_r: int = 16
    epochs: float = 2.0
    lr: float = (
        5e-4  # the learning curves' setting (README): the defaults are the measured configuration
    )
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    max_train: int | None = None
    beta: float | None = (
        None  # generalised JSD weight: 0 forward KL, 1 reverse KL (kd: 0, gkd: 0.5)
    )
    lmbda: float = 0.5  # gkd: share of batches whose answers the student samples itself (on-policy)
    gen_max_new_tokens: int = 64  # gkd: length of the student's own answers
    gen_temperature: float = 1.0  # gkd: sampling temperature of the student's answers
    save_steps: int = (
        100  # checkpoint every this many optimiser steps (0: never); a rerun resumes from it
    )
    resume: bool = (
        True  # continue from OUT/checkpoints when it holds this run's checkpoint; False starts over
    )
    # Speed (the same loss either way; bench/distill_train_speed.py measures both settings side by side):
    group_by_length: bool = (
        True  # batches of similar lengths (HF's LengthGroupedSampler): less padding
    )
    sparse_logits: bool = (
        True  # output layer only where a loss is taken (the answer), not over the prompt
    )
    # fp32 | bf16 (the HF Trainer's mixed precision: autocast, float32 master weights) | tf32 (float32
    # with TF32 matrix products: NVIDIA Ampere or newer). The README's curves: fp32 on CPUs, tf32 on
    # an H200, which reproduced a CPU point to 0.01 nats (bench/results/distill_curves_gpu.json).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise ConfigError(
                f"--beta {self.beta}: use a value in [0, 1] (0 forward KL, 1 reverse KL)"
            )
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(
                f"--ce-weight {self.ce_weight}: use a share in [0, 1] (0 top-k KD only, 1 SFT only)"
            )
        if self.ce_weight and self.loss not in ("topk-kd", "auto"):
            raise ConfigError(
                f"--ce-weight mixes cross-entropy into --loss topk-kd (or auto), not {self.loss}"
            )
        if self.unlikelihood is not None and self.unlikelihood < 0:
            raise ConfigError(
                f"--unlikelihood {self.unlikelihood}: use a weight of 0 (off) or more"
            )
        if self.unlikelihood and self.loss in LOCAL_TEACHER_LOSSES:
            raise ConfigError(
                f"--unlikelihood is added to --loss sft or topk-kd (or auto), not {self.loss}"
            )
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"--lmbda {self.lmbda}: use a share in [0, 1]")
        if self.gen_max_new_tokens < 1 or self.gen_temperature <= 0:
            raise ConfigError(
                "--gen-max-new-tokens must be at least 1 and --gen-temperature above 0"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.save_steps < 0:
            raise ConfigError(f"--save-steps {self.save_steps}: use 0 (no checkpoints) or more")
        if not self.epochs > 0 or not self.lr > 0:
            raise ConfigError(f"--epochs {self.epochs} and --lr {self.lr}: both must be above 0")
        for name in ("batch_size", "grad_accum", "lora_r", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: use 1 or more"
                )
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(
                f"--max-train {self.max_train}: use 1 or more (or leave it out for all examples)"
            )
        if self.student.startswith("prune:"):
            parse_prune_spec(
                self.student
            )  # a typo fails here, not after the teacher is loaded (or harvested)

    @property
    def unlikelihood_weight(self) -> float:
        if self.unlikelihood is not None:
            return self.unlikelihood
        return 0.0 if self.loss in LOCAL_TEACHER_LOSSES else 1.0

    @property
    def jsd_beta(self) -> float:
        return self.beta if self.beta is not None else (0.0 if self.loss == "kd" else 0.5)


# ---- students ------------------------------------------------------------------------------

PRUNE_METHODS = ("influence", "block", "even")


@contextlib.contextmanager
def only_layers(lm: LoadedModel, idx: list[int]):
    """``lm`` with only the decoder layers ``idx`` for the duration, the teacher's own swapped back
    after (no copy: fine for forward passes without a KV cache, which is what indexes layers)."""
    layers = lm.model.model.layers
    lm.model.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    try:
        yield lm
    finally:
        lm.model.model.layers = layers


def layer_subset(lm: LoadedModel, idx: list[int]) -> torch.nn.Module:
    """A deep copy of ``lm.model`` with only the decoder layers ``idx`` (only those are copied)."""
    with only_layers(lm, idx):
        model = copy.deepcopy(lm.model)
    for new, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return model


def _hidden_states(lm: LoadedModel, pairs: list[tuple[str, str]] | None, max_answer_tokens: int):
    """Every decoder layer's input and output (``n + 1`` states) on real conversations: the
    bundled ShareGPT first turns by default, so choosing a student's layers spends no teacher query."""
    if pairs is None:
        from distillguard.data.sharegpt import first_turn_pairs

        pairs = first_turn_pairs(24)
    for prompt, answer in pairs:
        prompt_ids = lm.chat_ids([{"role": "user", "content": prompt}])
        answer_ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        ids = torch.tensor([(prompt_ids + answer_ids)[-lm.context_length :]], device=lm.device)
        yield lm.model(ids, output_hidden_states=True, use_cache=False).hidden_states


@torch.inference_mode()
def block_influence(
    lm: LoadedModel, pairs: list[tuple[str, str]] | None = None, max_answer_tokens: int = 96
) -> torch.Tensor:
    """Block Influence of every decoder layer (ShortGPT, Men et al. 2024): 1 - cos(h_in, h_out)
    averaged over the tokens of real conversations. A layer that barely turns the residual stream
    can go.

    Hand-written: a forward pass with ``output_hidden_states`` and a cosine; no pruning library
    in our dependencies computes it for a Hugging Face decoder.
    """
    n = len(lm.model.model.layers)
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for hidden in _hidden_states(lm, pairs, max_answer_tokens):
        for i in range(n):  # every position, the chat template's included, as ShortGPT does
            cos = torch.nn.functional.cosine_similarity(
                hidden[i][0].float(), hidden[i + 1][0].float(), dim=-1
            )
            total[i] += float((1 - cos).mean())
        count += 1
    return total / max(count, 1)


@torch.inference_mode()
def block_distance(
    lm: LoadedModel,
    drop: int,
    pairs: list[tuple[str, str]] | None = None,
    max_answer_tokens: int = 96,
) -> torch.Tensor:
    """For every start ``l``, the angular distance arccos(cos(h_l, h_{l+drop})) / pi between the
    residual stream before layer ``l`` and after layer ``l + drop - 1``, at the last token,
    averaged over real conversations (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
    the Deeper Layers"). The contiguous block with the smallest distance changes the stream least:
    the layers after it still get the input they were trained on. Entry ``l`` is for dropping
    layers ``l .. l + drop - 1``; hand-written for the reason :func:`block_influence` is.
    """
    n = len(lm.model.model.layers)
    total, count = torch.zeros(n - drop + 1, dtype=torch.float64), 0
    for hidden in _hidden_states(lm, pairs, max_answer_tokens):
        for start in range(n - drop + 1):
            cos = torch.nn.functional.cosine_similarity(
                hidden[start][0, -1].float(), hidden[start + drop][0, -1].float(), dim=0
            )
            total[start] += math.acos(float(cos.clamp(-1, 1))) / math.pi
        count += 1
    return total / max(count, 1)


def prune_layers(
    lm: LoadedModel, keep: int, how: str = "influence", pairs: list[tuple[str, str]] | None = None
) -> LoadedModel:
    """A student made of ``keep`` decoder layers of ``lm`` (first and last always kept).

    ``influence`` (default): the layers with the largest Block Influence on real text
    (:func:`block_influence`). Measured on SmolLM2-135M-Instruct (``bench/distill_curves.py``,
    README): untrained, 15 of its 30 layers chosen this way give 5.2 nats/token on held-out
    teacher answers where 15 evenly spaced layers give 12.8 (8 layers: 9.7 vs 16.9): the middle
    layers turn the residual stream least. ``block``: drop the contiguous block of ``n - keep``
    layers with the smallest angular distance (:func:`block_distance`): untrained ``prune:11``
    7.73 nats where ``influence`` gives 10.62, but after top-k KD on 1,000 teacher answers 2.52
    against 2.49 (``docs/decisions/prune-layer-choice.md``), so the lead does not
    last and ``influence`` stays the default. ``even``: evenly spaced layers.
    """
    layers = lm.model.model.layers
    n = len(layers)
    if not 1 <= keep <= n:
        raise ConfigError(f"prune:{keep}: the teacher has {n} layers; keep between 1 and {n}")
    if how not in PRUNE_METHODS:
        raise ConfigError(
            f"prune:{keep}:{how}: unknown layer choice; use one of {', '.join(PRUNE_METHODS)}"
        )
    if keep == 1:
        idx = [0]
    elif how == "even" or keep == n:
        idx = sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})
    elif how == "block":
        drop = n - keep
        distance = block_distance(lm, drop, pairs)
        start = min(range(1, n - drop), key=lambda s: float(distance[s]))
        idx = [i for i in range(n) if not start <= i < start + drop]
    else:
        influence = block_influence(lm, pairs)
        middle = sorted(range(1, n - 1), key=lambda i: -float(influence[i]))[: keep - 2]
        idx = sorted([0, n - 1, *middle])
    return LoadedModel(
        spec=f"{lm.spec}:prune{len(idx)}",
        model=layer_subset(lm, idx),
        tokenizer=lm.tokenizer,
        device=lm.device,
        context_length=lm.context_length,
        eos_token_ids=lm.eos_token_ids,
    )


@torch.inference_mode()
def mlp_importance(
    lm: LoadedModel, pairs: list[tuple[str, str]] | None = None, max_answer_tokens: int = 96
) -> list[torch.Tensor]:
    """Per decoder layer, the mean magnitude of each MLP neuron's activation (the input of
    ``down_proj``) over the tokens of real conversations: the activation-based width importance
    of Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
    Distillation"), no gradient and no teacher query. Hand-written: a forward hook and a mean;
    no library in our dependencies prunes a Hugging Face decoder's MLP width."""
    layers = lm.model.model.layers
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tokens = 0

    def hook(i: int):
        def record(module, args) -> None:
            magnitude = args[0].detach().float().abs().sum(dim=(0, 1))
            sums[i] = magnitude if sums[i] is None else sums[i] + magnitude

        return record

    if not all(hasattr(getattr(layer, "mlp", None), "down_proj") for layer in layers):
        raise ConfigError(
            f"{lm.spec}: MLP width pruning needs gated MLPs with gate/up/down projections (Llama family)"
        )
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    try:
        for hidden in _hidden_states(lm, pairs, max_answer_tokens):
            tokens += hidden[0].shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(tokens, 1) for s in sums]


def shrink_mlp(
    lm: LoadedModel, width: int, pairs: list[tuple[str, str]] | None = None
) -> LoadedModel:
    """``lm`` (changed in place) with every MLP cut to its ``width`` most important neurons
    (:func:`mlp_importance`): rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``.
    Width pruning keeps every layer's attention and so the depth; Minitron found it recovers
    better than dropping layers at the same size once retrained."""
    config = lm.model.config
    full = getattr(config, "intermediate_size", None)
    if not full or not 1 <= width <= full:
        raise ConfigError(
            f"mlp{width}: the MLP has {full} neurons per layer; keep between 1 and {full}"
        )
    if width == full:
        return lm
    importance = mlp_importance(lm, pairs)

    def cut(old: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
        weight = old.weight.detach().index_select(dim, idx).clone()
        new = torch.nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=old.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.weight = torch.nn.Parameter(weight)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(
                (old.bias.detach()[idx] if dim == 0 else old.bias.detach()).clone()
            )
        return new

    for layer, scores in zip(lm.model.model.layers, importance):
        keep = torch.topk(scores, width).indices.sort().values.to(layer.mlp.down_proj.weight.device)
        layer.mlp.gate_proj = cut(layer.mlp.gate_proj, keep, 0)
        layer.mlp.up_proj = cut(layer.mlp.up_proj, keep, 0)
        layer.mlp.down_proj = cut(layer.mlp.down_proj, keep, 1)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = width
    config.intermediate_size = width  # save_pretrained / from_pretrained rebuild the same shapes
    lm.spec = f"{lm.spec}:mlp{width}"
    return lm


def parse_prune_spec(spec: str) -> tuple[int, str, int | None]:
    """``prune:K[:how][:mlpW]`` -> (K, how, W or None)."""
    usage = f"use prune:K[:{'|'.join(PRUNE_METHODS)}][:mlpW] with integers K and W"
    _, keep, *rest = spec.split(":")
    how, width = "influence", None
    try:
        keep = int(keep)
        if rest and rest[0] in PRUNE_METHODS:
            how = rest.pop(0)
        if rest and rest[0].startswith("mlp"):
            width = int(rest.pop(0)[3:])
        if rest:
            raise ValueError(rest)
    except ValueError:
        raise ConfigError(f"--student {spec!r}: {usage}") from None
    return keep, how, width


def load_student(spec: str, teacher: str | LoadedModel) -> LoadedModel:
    """``spec`` as a student; ``prune:K[:how][:mlpW]`` copies K layers of ``teacher`` (a spec or a
    loaded model), chosen by ``how`` (``influence``, the default, ``block`` or ``even``), and with
    ``mlpW`` cuts every MLP to its W most active neurons (:func:`shrink_mlp`)."""
    if spec.startswith("prune:"):
        keep, how, width = parse_prune_spec(spec)
        lm = teacher if isinstance(teacher, LoadedModel) else load_model(teacher, device="cpu")
        student = prune_layers(lm, keep, how)
        return shrink_mlp(student, width) if width is not None else student
    return load_model(spec, device="cpu")


def require_same_tokenizer(teacher: LoadedModel, student: LoadedModel, loss: str) -> None:
    """Full-logit KD compares distributions id by id: the two vocabularies must be identical."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"--loss {loss} needs the teacher's tokenizer, but teacher {teacher.spec} ({len(t_vocab)} tokens) and "
            f"student {student.spec} ({len(s_vocab)} tokens) differ (e.g. {differ}); use --loss sft, or a student "
            f"of the teacher's family (e.g. --student prune:K)"
        )


# ---- examples --------------------------------------------------------------------------------


def sft_example(
    lm: LoadedModel, messages: list[dict], response: str, max_length: int, *, capped: bool = False
) -> dict | None:
    """input_ids of prompt + answer in the chat template, labels only on the answer (and its end).

    ``capped``: the answer was cut at the harvest's max_tokens (``finish_reason: length``), so it
    did not end there, and its end-of-turn is left out: a student taught to stop where the cap
    fell would stop mid-sentence."""
    prompt = lm.chat_ids(messages)
    full = lm.tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=True
    )
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[: len(prompt)] != prompt:
        raise ConfigError(
            "the student's chat template renders the prompt differently with and without the "
            "answer; cannot mask the prompt reliably"
        )
    # Train on the answer and the end-of-turn token, not on what the template appends after it.
    end = len(full)
    while end > len(prompt) and full[end - 1] not in lm.eos_token_ids:
        end -= 1
    end = end if end > len(prompt) else len(full)
    if capped and end > len(prompt) and full[end - 1] in lm.eos_token_ids:
        end -= 1
    ids = full[:end][:max_length]
    if len(ids) <= len(prompt):
        return None  # no answer token fits
    labels = [IGNORE] * len(prompt) + ids[len(prompt) :]
    return {"input_ids": ids, "labels": labels[: len(ids)], "prompt_len": len(prompt)}


def topk_examples(lm: LoadedModel, rows: list[dict], max_length: int) -> list[dict | None]:
    """Top-k KD examples of harvested rows; ConfigError when they carry no top-k logprobs or
    tokens the student's vocabulary does not have."""
    byte_to_id = _byte_index(lm)
    k = max(
        (len(e.get("top_logprobs", [])) for r in rows for e in json.loads(r["logprobs"] or "[]")),
        default=0,
    )
    if k == 0:
        raise ConfigError("--loss topk-kd needs harvested logprobs: harvest with --top-logprobs K")
    return [
        kd_example(lm, byte_to_id, r["messages"], json.loads(r["logprobs"]), max_length, k)
        for r in rows
        if r["logprobs"]
    ]


def kd_example(
    lm: LoadedModel,
    byte_to_id: dict[bytes, int],
    messages: list[dict],
    entries: list[dict],
    max_length: int,
    k: int,
) -> dict | None:
    """Teacher's own token sequence with its top-k distribution at every answer position."""
    prompt = lm.chat_ids(messages)
    answer, top_ids, top_lps = [], [], []
    for entry in entries:
        tok = byte_to_id.get(bytes(entry["bytes"]))
        alts = [
            (byte_to_id.get(bytes(a["bytes"])), a["logprob"]) for a in entry.get("top_logprobs", [])
        ]
        if tok is None or any(t is None for t, _ in alts):
            raise ConfigError(
                "the harvested logprobs use tokens the student's vocabulary does not have: top-k KD needs a "
                "student with the teacher's tokenizer (use --loss sft, or a student from the same family)"
            )
        answer.append(tok)
        alts = alts[:k] + [(0, float("-inf"))] * (k - len(alts[:k]))
        top_ids.append([t for t, _ in alts])
        top_lps.append([max(lp, -1e4) if lp != float("-inf") else float("-inf") for _, lp in alts])
    eos = sorted(lm.eos_token_ids)[0]
    ids = (prompt + answer + [eos])[:max_length]
    n_answer = (
        len(ids) - len(prompt) - 1
    )  # positions predicting answer tokens (the eos step has no top-k)
    if n_answer < 1:
        return None
    # Position t predicts token t+1: answer token j is predicted at position len(prompt)-1+j.
    return {
        "input_ids": ids,
        "labels": [IGNORE] * len(prompt) + ids[len(prompt) :],
        "kd_start": len(prompt) - 1,
        "topk_ids": top_ids[:n_answer],
        "topk_logprobs": top_lps[:n_answer],
    }


def collate(batch: list[dict], pad_id: int, *, prompts: bool = False) -> dict:
    """Right-padded ids, mask and labels; with ``prompts`` also the left-padded prompts alone
    (``prompt_ids``, ``prompt_mask``) for on-policy generation."""
    width = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.tensor(
            [b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        ),
        "labels": torch.tensor(
            [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
        ),
    }
    if prompts:
        heads = [b["input_ids"][: b["prompt_len"]] for b in batch]
        p = max(map(len, heads))
        out["prompt_ids"] = torch.tensor([[pad_id] * (p - len(h)) + h for h in heads])
        out["prompt_mask"] = torch.tensor([[0] * (p - len(h)) + [1] * len(h) for h in heads])
    if "topk_ids" in batch[0]:
        k = len(batch[0]["topk_ids"][0])
        ids = torch.zeros((len(batch), width, k), dtype=torch.long)
        lps = torch.full((len(batch), width, k), float("-inf"))
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, ex in enumerate(batch):
            s, n = ex["kd_start"], len(ex["topk_ids"])
            ids[b, s : s + n] = torch.tensor(ex["topk_ids"])
            lps[b, s : s + n] = torch.tensor(ex["topk_logprobs"])
            mask[b, s : s + n] = True
        out.update(topk_ids=ids, topk_logprobs=lps, kd_mask=mask)
    return out


# ---- training -------------------------------------------------------------------------------


def train(config: TrainConfig, *, callbacks=(), student: LoadedModel | None = None) -> dict:
    """Train and save the student to ``config.out``; returns a summary (losses, sizes, steps).

    ``student``: a model built by the caller (e.g. one whose layers or head were changed) to train
    instead of loading ``config.student``, which then only names it. Its starting weights are part
    of the run's fingerprint, so a checkpoint of another starting point is never resumed.
    """
    from datasets import load_from_disk

    if config.precision == "tf32" and not torch.cuda.is_available():
        raise ConfigError(
            "--precision tf32 needs an NVIDIA GPU (Ampere or newer); use fp32 or bf16 here"
        )
    torch.manual_seed(config.seed)
    data_dir = Path(config.data)
    if not (data_dir / "dataset_dict.json").is_file():
        raise ConfigError(
            f"{data_dir} is not a curated dataset directory (run `distillguard distill curate`)"
        )
    ds = load_from_disk(str(data_dir))
    teacher = None
    if config.loss in LOCAL_TEACHER_LOSSES or (
        student is None and config.student.startswith("prune:")
    ):
        teacher = load_model(config.teacher, device="cpu")
    given = student is not None
    if not given:
        student = load_student(config.student, teacher or config.teacher)
    if config.loss in LOCAL_TEACHER_LOSSES:
        require_same_tokenizer(teacher, student, config.loss)
    tok = student.tokenizer
    rows = list(ds["train"])[: config.max_train]
    loss = config.loss
    examples = None
    if loss in ("topk-kd", "auto"):
        try:
            examples = topk_examples(student, rows, config.max_length)
            loss = "topk-kd"
        except ConfigError:
            if loss == "topk-kd":
                raise
            # auto: no top-k logprobs, or not in the student's vocabulary: plain SFT
    if examples is None:
        loss = "sft" if loss == "auto" else loss
        examples = [
            sft_example(
                student,
                r["messages"],
                r["response"],
                config.max_length,
                capped=r.get("finish_reason") == "length",
            )
            for r in rows
        ]
    kept = [r for r, e in zip(rows, examples) if e is not None]
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ConfigError(f"no usable training examples in {data_dir}")
    model = student.model
    model.train()
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=2 * config.lora_r,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    checkpoints = Path(config.out) / "checkpoints"
    fingerprint = run_fingerprint(config, examples, model if given else None)
    finished = Path(config.out) / "train_summary.json"
    if (
        config.resume
        and finished.is_file()
        and (out_summary := json.loads(finished.read_text())).get("run_fingerprint") == fingerprint
        and (Path(config.out) / "config.json").is_file()
    ):
        # The same run already finished here (same settings, examples, starting point): rerunning a
        # command, or a pipeline, must not spend hours to write the same student again.
        return {**out_summary, "already_trained": True}
    resume_from, mark = (
        resume_point(checkpoints, fingerprint, config.resume) if config.save_steps else (None, {})
    )
    args = TrainingArguments(
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, len(examples) // (10 * config.batch_size)),
        logging_steps=5,
        report_to=[],
        disable_tqdm=True,
        seed=config.seed,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=config.precision == "bf16",
        tf32=True if config.precision == "tf32" else None,
    )
    if config.loss in LOCAL_TEACHER_LOSSES:
        trainer = LogitKDTrainer(
            teacher=teacher.model,
            beta=config.jsd_beta,
            lmbda=config.lmbda if config.loss == "gkd" else 0.0,
            vocab=len(tok),
            eos_token_ids=sorted(student.eos_token_ids),
            pad_token_id=tok.pad_token_id,
            max_new_tokens=config.gen_max_new_tokens,
            temperature=config.gen_temperature,
            seed=config.seed,
            sparse_logits=config.sparse_logits,
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=lambda b: collate(b, tok.pad_token_id, prompts=True),
            callbacks=list(callbacks),
        )
    else:
        kwargs = {"ce_weight": config.ce_weight} if loss == "topk-kd" else {}
        trainer = (KDTrainer if loss == "topk-kd" else SFTTrainer)(
            model=model,
            args=args,
            train_dataset=examples,
            sparse_logits=config.sparse_logits,
            unlikelihood=config.unlikelihood_weight,
            data_collator=lambda b: collate(b, tok.pad_token_id),
            callbacks=list(callbacks),
            **kwargs,
        )
    if isinstance(trainer, LogitKDTrainer):
        trainer.on_policy_batches = mark.get("on_policy_batches", 0)
    trainer.add_callback(CheckpointMarks(fingerprint, trainer, mark.get("train_seconds", 0.0)))
    stop = StopOnSigterm()
    trainer.add_callback(stop)
    with stop.installed(
        enabled=bool(config.save_steps)
    ):  # without checkpoints there is nothing to resume
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.stopped_at is not None:  # the checkpoint is saved; the student is not finished
        raise IncompleteError(
            f"stopped by SIGTERM after step {stop.stopped_at} of {trainer.state.max_steps}; its "
            f"checkpoint is in {checkpoints}, and the same command continues from it"
        )
    if config.lora:
        model = model.merge_and_unload()
    out = Path(config.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(
        checkpoints, ignore_errors=True
    )  # the student is saved; a checkpoint is 3x its size
    history = [h for h in trainer.state.log_history if "loss" in h]
    runtime, start_step = result.metrics["train_runtime"], mark.get("step", 0)
    share_this_run = (result.global_step - start_step) / max(result.global_step, 1)
    summary = {
        "student": config.student,
        "loss": loss,
        "requested_loss": config.loss,
        "examples": len(examples),
        # teacher queries behind them: distinct prompts (the n answers of one request share one)
        "queries": len(distinct_prompts(kept)),
        "precision": config.precision,
        "student_given": given,
        "beta": config.jsd_beta if config.loss in LOCAL_TEACHER_LOSSES else None,
        "unlikelihood": config.unlikelihood_weight
        if config.loss not in LOCAL_TEACHER_LOSSES
        else None,
        "on_policy_batches": getattr(trainer, "on_policy_batches", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": result.global_step,
        "resumed_from_step": start_step,
        # Over every run that made this student (a resumed run adds its time to the earlier ones').
        "train_seconds": mark.get("train_seconds", 0.0) + runtime,
        # Non-padding tokens through the student per second of training, this run only (the
        # on-policy answers of gkd not counted): the speed bench's metric.
        "tokens_per_s": share_this_run
        * config.epochs
        * sum(len(e["input_ids"]) for e in examples)
        / runtime,
        "train_loss": result.training_loss,
        # to reproduce it: every setting, the run's fingerprint (settings, exact examples, a given
        # student's starting weights: what a resumed checkpoint must match) and the versions
        "config": asdict(config),
        "run_fingerprint": fingerprint,
        "versions": versions(),
        "history": history,
        # the last logged loss (every 5 steps); a run shorter than that has only its mean
        "final_loss": history[-1]["loss"] if history else result.training_loss,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


CHECKPOINT_MARK = "distillguard_checkpoint.json"


def run_fingerprint(
    config: TrainConfig, examples: list[dict], given_student: torch.nn.Module | None = None
) -> str:
    """What makes two runs the same run: every setting but where things are, the exact examples,
    and the starting weights of a student the caller built (``train(student=...)``)."""
    settings = {
        k: v for k, v in asdict(config).items() if k not in ("data", "out", "save_steps", "resume")
    }
    settings["unlikelihood"] = (
        config.unlikelihood_weight
    )  # the weight used, whether spelled out or the default
    for name, default in (("precision", "fp32"), ("ce_weight", 0.0), ("unlikelihood", 0.0)):
        if (
            settings[name] == default
        ):  # a later setting at its default: checkpoints from before it still resume
            del settings[name]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(examples).encode())
    if given_student is not None:
        for name, tensor in given_student.state_dict().items():
            digest.update(name.encode())
            digest.update(
                tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
    return digest.hexdigest()


def resume_point(directory: Path, fingerprint: str, resume: bool) -> tuple[Path | None, dict]:
    """The last complete checkpoint of this run under ``directory`` and its mark, or ``(None, {})``.

    Checkpoints without a mark were cut off while being written and are deleted; with ``resume``
    off every checkpoint is. A checkpoint of another run is refused rather than silently mixed in.
    """
    if not directory.is_dir():
        return None, {}
    if not resume:
        shutil.rmtree(directory)
        return None, {}
    complete = []
    for d in directory.glob("checkpoint-*"):
        if (d / CHECKPOINT_MARK).is_file():
            complete.append(d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    if not complete:
        return None, {}
    last = max(complete, key=lambda d: int(d.name.rsplit("-", 1)[1]))
    mark = json.loads((last / CHECKPOINT_MARK).read_text())
    if mark.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{directory} holds a checkpoint of a different training run (other data or settings); "
            "rerun with the original settings to continue it, or with --no-resume to start over"
        )
    return last, mark


class CheckpointMarks(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it, then deletes the older ones.

    The Trainer's own rotation (``save_total_limit``) deletes the previous checkpoint as soon as the
    new one is written, so nothing tells a whole checkpoint from one cut off by a crash; the mark,
    written last and atomically, does. It also carries what the Trainer's state does not: the run's
    fingerprint, the training seconds so far and gkd's count of on-policy batches.
    """

    def __init__(self, fingerprint: str, trainer: Trainer, seconds_before: float):
        self.fingerprint, self.trainer, self.seconds_before = fingerprint, trainer, seconds_before
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        here = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        mark = {
            "fingerprint": self.fingerprint,
            "step": state.global_step,
            "train_seconds": self.seconds_before + time.perf_counter() - self.started,
            "on_policy_batches": getattr(self.trainer, "on_policy_batches", None),
        }
        tmp = here / (CHECKPOINT_MARK + ".tmp")
        tmp.write_text(json.dumps(mark))
        os.replace(tmp, here / CHECKPOINT_MARK)
        for old in here.parent.glob("checkpoint-*"):
            if old != here:
                shutil.rmtree(old, ignore_errors=True)


class StopOnSigterm(TrainerCallback):
    """SIGTERM (``kill``, a container stop, a cluster's pre-emption notice) ends training at the end
    of the current optimiser step with a checkpoint, instead of losing the steps since the last
    ``--save-steps`` with the process. The HF Trainer has no such switch; its control flags do it."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def installed(self, enabled: bool = True):
        import signal
        import threading

        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and self.stopped_at is None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class ProgressCallback(TrainerCallback):
    """Drives a rich ``Progress`` from the Trainer: one task over the run's optimiser steps (starting
    where a resumed run starts) with the latest logged loss in its ``loss`` field; the caller owns
    the Progress and its columns, e.g. ``TextColumn("loss {task.fields[loss]}")``."""

    def __init__(self, progress, description: str = "train"):
        self.progress, self.description, self.task = progress, description, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, loss="-"
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.3f}")


def _byte_index(lm: LoadedModel) -> dict[bytes, int]:
    """Token bytes -> id. Ordinary tokens first; special tokens (e.g. ``<|im_end|>``, which the API
    lists among the top-k alternatives near the end of an answer) only where no ordinary token
    has their bytes."""
    index: dict[bytes, int] = {}
    special = set(lm.tokenizer.all_special_ids)
    for i, b in enumerate(lm.token_bytes):
        if b and i not in special:
            index.setdefault(b, i)
    for i in sorted(special):
        if i < len(lm.token_bytes) and lm.token_bytes[i]:
            index.setdefault(lm.token_bytes[i], i)
    return index


def answer_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    sparse: bool = True,
) -> torch.Tensor:
    """Logits at the selected positions only: (N, V) for ``select`` (B, T) boolean.

    The output layer of a small student is a large share of its compute (SmolLM2's tied
    49,152 x 576 embedding is half of an 8-layer prune), and the loss only looks at the answer,
    a third of the tokens, so ``sparse`` runs the decoder on every position and the output layer
    on the selected hidden states alone (the same numbers as the full logits indexed by
    ``select``; tested). Models whose head does more than a projection (logit soft-capping) fall
    back to the full forward.
    """
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = model.get_output_embeddings()
    if (
        not sparse
        or decoder is None
        or head is None
        or getattr(model.config, "final_logit_softcapping", None)
    ):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits[select]
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return head(hidden[select])  # (N, H) -> (N, V)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) positions whose next token carries a label: position t predicts token t+1."""
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != IGNORE
    return select


class _MeanLossTrainer(Trainer):
    """Base of our trainers: ``compute_loss`` returns the batch mean, so the Trainer must scale it
    for gradient accumulation itself (it skips that when the model accepts ``num_items_in_batch``)."""

    def __init__(self, *args, sparse_logits: bool = True, unlikelihood: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sparse_logits = sparse_logits
        self.unlikelihood = unlikelihood
        self.model_accepts_loss_kwargs = False

    def plus_unlikelihood(self, loss, logits, targets, select):
        """``loss`` plus the token-level unlikelihood term at the selected positions: ``targets``
        (N,) are the tokens written there, in the row order of ``logits`` (N, V) and ``select``."""
        if not self.unlikelihood:
            return loss
        answers = targets.split(
            select.sum(dim=1).tolist()
        )  # per sequence, its answer's tokens in order
        return loss + self.unlikelihood * unlikelihood_loss(
            logits, previous_token_candidates(answers, logits.shape[-1])
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The sparse output layer (answer_logits) calls the decoder and the head directly, around the
        # forward that accelerate wraps in autocast, so mixed precision (--precision bf16) is entered
        # here: without this it silently trained in float32 (tested). A no-op in float32.
        with self.accelerator.autocast():
            return self.loss_of(model, inputs, return_outputs)

    def loss_of(self, model, inputs, return_outputs: bool):
        raise NotImplementedError

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(
                sampler.batch_size, lengths=sampler.lengths, seed=self.args.seed
            )
        return sampler


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length-grouped order, drawn from a generator seeded by (seed, epoch).

    HF's sampler draws each epoch's order from the global RNG, whose state at the start of an epoch
    a resumed run cannot have (a checkpoint holds the state at the step it was saved), so a run
    resumed mid-training would see other batches than one that never stopped. The Trainer calls
    ``set_epoch`` at every epoch's start, before the order is drawn.
    """

    def __init__(self, batch_size: int, *, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)


class SFTTrainer(_MeanLossTrainer):
    """Cross-entropy on the labelled (answer) tokens: the model's own causal-LM loss, with the
    output layer applied only where a label is (see :func:`answer_logits`)."""

    def loss_of(self, model, inputs, return_outputs: bool):
        labels = inputs["labels"]  # (B, T)
        select = shifted(labels)
        logits = answer_logits(
            model, inputs["input_ids"], inputs["attention_mask"], select, sparse=self.sparse_logits
        )  # (N, V)
        targets = labels[:, 1:][select[:, :-1]]
        loss = self.plus_unlikelihood(
            torch.nn.functional.cross_entropy(logits.float(), targets), logits, targets, select
        )
        return (loss, {"logits": logits}) if return_outputs else loss


class KDTrainer(_MeanLossTrainer):
    """Trainer whose loss is the sparse top-k KL to the teacher at every answer position, mixed with
    ``ce_weight`` of cross-entropy on the teacher's sampled tokens at the same positions."""

    def __init__(self, *args, ce_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ce_weight = ce_weight

    def loss_of(self, model, inputs, return_outputs: bool):
        topk_ids, topk_lps, kd_mask = (
            inputs["topk_ids"],
            inputs["topk_logprobs"],
            inputs["kd_mask"],
        )  # (B, T, K), (B, T)
        logits = answer_logits(
            model, inputs["input_ids"], inputs["attention_mask"], kd_mask, sparse=self.sparse_logits
        )  # (N, V)
        loss = topk_kd_loss(logits, topk_ids[kd_mask], topk_lps[kd_mask])
        targets = inputs["input_ids"].roll(-1, dims=1)[
            kd_mask
        ]  # (N,) position t predicts token t+1
        if self.ce_weight:
            ce = torch.nn.functional.cross_entropy(logits.float(), targets)
            loss = (1 - self.ce_weight) * loss + self.ce_weight * ce
        loss = self.plus_unlikelihood(loss, logits, targets, kd_mask)
        return (loss, {"logits": logits}) if return_outputs else loss


class LogitKDTrainer(_MeanLossTrainer):
    """Full-logit distillation from a local teacher: generalised JSD at every answer position.

    With ``lmbda > 0`` this is GKD (Agarwal et al. 2024, Algorithm 1): each batch, with
    probability ``lmbda``, the harvested answers are replaced by answers the student samples
    itself from the same prompts, and the teacher scores those; the loss then teaches the student
    what the teacher would have said at the states the student actually visits. TRL's
    ``GKDTrainer`` does the same but wants TRL's own chat dataset and collator; this keeps our
    examples (prompt masked, answer and its end-of-turn labelled, see ``sft_example``) so all
    losses train on exactly the same tokens.
    """

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module,
        beta: float,
        lmbda: float,
        vocab: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_new_tokens: int,
        temperature: float,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.beta, self.lmbda, self.vocab = beta, lmbda, vocab
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.seed = seed
        self.on_policy_batches = 0
        self._draws: tuple[int, int] = (-1, 0)  # (optimiser step, draws within it)

    def on_policy_now(self) -> bool:
        """Whether this batch is answered by the student: a draw seeded by the optimiser step, so a
        run resumed from a checkpoint makes the same choices as one that never stopped."""
        step, n = self._draws
        self._draws = (self.state.global_step, n + 1 if step == self.state.global_step else 0)
        return random.Random(f"{self.seed}:{self._draws[0]}:{self._draws[1]}").random() < self.lmbda

    @torch.no_grad()
    def student_answers(self, model, inputs: dict) -> dict:
        """The batch rebuilt around answers the student samples: left-padded prompt + answer up to
        and including its first end-of-turn, labels on the answer only (as GKD's on-policy step)."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]  # (B, P)
        was_training = model.training
        model.eval()
        seqs = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=self.temperature,
            top_k=0,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )  # (B, P+G)
        model.train(was_training)
        answer = seqs[:, prompt_ids.shape[1] :]  # (B, G)
        is_end = torch.isin(answer, torch.tensor(self.eos_token_ids, device=answer.device))
        after_end = (is_end.cumsum(-1) - is_end.long()) > 0  # strictly after the first end-of-turn
        answer_mask = (~after_end).long()
        labels = answer.masked_fill(after_end, IGNORE)
        return {
            "input_ids": seqs,
            "attention_mask": torch.cat([prompt_mask, answer_mask], dim=1),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE), labels], dim=1),
        }

    def loss_of(self, model, inputs, return_outputs: bool):
        if self.lmbda > 0 and model.training and self.on_policy_now():
            inputs = self.student_answers(model, inputs)
            self.on_policy_batches += 1
        ids, mask, labels = (
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["labels"],
        )  # (B, T)
        # Positions from the mask, so left-padded (on-policy) and right-padded rows both count from 0.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        select = shifted(labels)  # (B, T): positions predicting answer tokens
        s = answer_logits(model, ids, mask, select, positions, sparse=self.sparse_logits)  # (N, V)
        with torch.no_grad():
            t = answer_logits(
                self.teacher, ids, mask, select, positions, sparse=self.sparse_logits
            )  # (N, V)
        # Only real tokens (output layers may be padded past the vocabulary).
        loss = generalized_jsd_loss(s[:, : self.vocab], t[:, : self.vocab], beta=self.beta)
        return (loss, {"logits": s}) if return_outputs else loss
