"""Train a student on curated teacher answers with the Hugging Face Trainer.

Losses: ``sft`` (cross-entropy on the assistant's tokens only, rendered with the student's chat
template) and ``topk-kd`` (sparse KD from the API's top-k logprobs; teacher and student must
share a tokenizer, checked token by token). Students: any ``load_model`` spec, ``prune:K`` (K
evenly spaced layers of the teacher, a smaller initialisation that keeps its knowledge), and
LoRA adapters through PEFT. Built on ``transformers.Trainer``, so accelerate, FSDP and
DeepSpeed work unchanged on GPUs.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from distillguard.distill.losses import topk_kd_loss
from distillguard.errors import ConfigError
from distillguard.models import LoadedModel, load_model

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    student: str = "prune:8"
    teacher: str = "smollm2"  # what prune:K starts from; also the tokenizer of the harvested logprobs
    loss: str = "sft"
    lora: bool = False
    lora_r: int = 16
    epochs: float = 2.0
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    max_train: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in ("sft", "topk-kd"):
            raise ConfigError(f"--loss {self.loss!r}: use sft or topk-kd (gkd needs a local teacher: not yet)")


# ---- students ------------------------------------------------------------------------------

def prune_layers(lm: LoadedModel, keep: int) -> LoadedModel:
    """A student made of ``keep`` evenly spaced decoder layers of ``lm`` (first and last kept)."""
    model = copy.deepcopy(lm.model)
    layers = model.model.layers
    n = len(layers)
    if not 1 <= keep <= n:
        raise ConfigError(f"prune:{keep}: the teacher has {n} layers; keep between 1 and {n}")
    idx = sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(keep)}) if keep > 1 else [0]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    for new, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return LoadedModel(spec=f"{lm.spec}:prune{len(idx)}", model=model, tokenizer=lm.tokenizer, device=lm.device,
                       context_length=lm.context_length, eos_token_ids=lm.eos_token_ids)


def load_student(spec: str, teacher: str) -> LoadedModel:
    if spec.startswith("prune:"):
        try:
            keep = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--student {spec!r}: use prune:K with an integer K") from None
        return prune_layers(load_model(teacher, device="cpu"), keep)
    return load_model(spec, device="cpu")


# ---- examples --------------------------------------------------------------------------------

def sft_example(lm: LoadedModel, messages: list[dict], response: str, max_length: int) -> dict | None:
    """input_ids of prompt + answer in the chat template, labels only on the answer (and its end)."""
    prompt = lm.chat_ids(messages)
    full = lm.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[:len(prompt)] != prompt:
        raise ConfigError("the student's chat template renders the prompt differently with and without the "
                          "answer; cannot mask the prompt reliably")
    # Train on the answer and the end-of-turn token, not on what the template appends after it.
    end = len(full)
    while end > len(prompt) and full[end - 1] not in lm.eos_token_ids:
        end -= 1
    end = end if end > len(prompt) else len(full)
    ids = full[:end][:max_length]
    if len(ids) <= len(prompt):
        return None  # no answer token fits
    labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    return {"input_ids": ids, "labels": labels[:len(ids)]}


def kd_example(lm: LoadedModel, byte_to_id: dict[bytes, int], messages: list[dict], entries: list[dict],
               max_length: int, k: int) -> dict | None:
    """Teacher's own token sequence with its top-k distribution at every answer position."""
    prompt = lm.chat_ids(messages)
    answer, top_ids, top_lps = [], [], []
    for entry in entries:
        tok = byte_to_id.get(bytes(entry["bytes"]))
        alts = [(byte_to_id.get(bytes(a["bytes"])), a["logprob"]) for a in entry.get("top_logprobs", [])]
        if tok is None or any(t is None for t, _ in alts):
            raise ConfigError(
                "the harvested logprobs use tokens the student's vocabulary does not have: top-k KD needs a "
                "student with the teacher's tokenizer (use --loss sft, or a student from the same family)")
        answer.append(tok)
        alts = alts[:k] + [(0, float("-inf"))] * (k - len(alts[:k]))
        top_ids.append([t for t, _ in alts])
        top_lps.append([max(lp, -1e4) if lp != float("-inf") else float("-inf") for _, lp in alts])
    eos = sorted(lm.eos_token_ids)[0]
    ids = (prompt + answer + [eos])[:max_length]
    n_answer = len(ids) - len(prompt) - 1  # positions predicting answer tokens (the eos step has no top-k)
    if n_answer < 1:
        return None
    # Position t predicts token t+1: answer token j is predicted at position len(prompt)-1+j.
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):],
            "kd_start": len(prompt) - 1, "topk_ids": top_ids[:n_answer], "topk_logprobs": top_lps[:n_answer]}


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.tensor([b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]),
        "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]),
        "labels": torch.tensor([b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]),
    }
    if "topk_ids" in batch[0]:
        k = len(batch[0]["topk_ids"][0])
        ids = torch.zeros((len(batch), width, k), dtype=torch.long)
        lps = torch.full((len(batch), width, k), float("-inf"))
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, ex in enumerate(batch):
            s, n = ex["kd_start"], len(ex["topk_ids"])
            ids[b, s:s + n] = torch.tensor(ex["topk_ids"])
            lps[b, s:s + n] = torch.tensor(ex["topk_logprobs"])
            mask[b, s:s + n] = True
        out.update(topk_ids=ids, topk_logprobs=lps, kd_mask=mask)
    return out


# ---- training -------------------------------------------------------------------------------

def train(config: TrainConfig, *, callbacks=()) -> dict:
    """Train and save the student to ``config.out``; returns a summary (losses, sizes, steps)."""
    from datasets import load_from_disk

    torch.manual_seed(config.seed)
    data_dir = Path(config.data)
    if not (data_dir / "dataset_dict.json").is_file():
        raise ConfigError(f"{data_dir} is not a curated dataset directory (run `distillguard distill curate`)")
    ds = load_from_disk(str(data_dir))
    student = load_student(config.student, config.teacher)
    tok = student.tokenizer
    rows = list(ds["train"])[: config.max_train]
    if config.loss == "sft":
        examples = [sft_example(student, r["messages"], r["response"], config.max_length) for r in rows]
    else:
        byte_to_id = _byte_index(student)
        k = max((len(e.get("top_logprobs", [])) for r in rows for e in json.loads(r["logprobs"] or "[]")), default=0)
        if k == 0:
            raise ConfigError("--loss topk-kd needs harvested logprobs: harvest with --top-logprobs K")
        examples = [kd_example(student, byte_to_id, r["messages"], json.loads(r["logprobs"]), config.max_length, k)
                    for r in rows if r["logprobs"]]
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ConfigError(f"no usable training examples in {data_dir}")
    model = student.model
    model.train()
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(Path(config.out) / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=max(1, len(examples) // (10 * config.batch_size)),
        logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True, seed=config.seed,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )
    trainer_cls = KDTrainer if config.loss == "topk-kd" else Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=examples,
                          data_collator=lambda b: collate(b, tok.pad_token_id), callbacks=list(callbacks))
    result = trainer.train()
    if config.lora:
        model = model.merge_and_unload()
    out = Path(config.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"student": config.student, "loss": config.loss, "examples": len(examples),
               "parameters": sum(p.numel() for p in model.parameters()), "steps": result.global_step,
               "train_loss": result.training_loss, "history": history,
               "final_loss": history[-1]["loss"] if history else math.nan}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _byte_index(lm: LoadedModel) -> dict[bytes, int]:
    index: dict[bytes, int] = {}
    special = set(lm.tokenizer.all_special_ids)
    for i, b in enumerate(lm.token_bytes):
        if b and i not in special:
            index.setdefault(b, i)
    return index


class KDTrainer(Trainer):
    """Trainer whose loss is the sparse top-k KL to the teacher at every answer position."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        topk_ids, topk_lps, kd_mask = inputs.pop("topk_ids"), inputs.pop("topk_logprobs"), inputs.pop("kd_mask")
        inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs.logits  # (B, T, V)
        loss = topk_kd_loss(logits[kd_mask], topk_ids[kd_mask], topk_lps[kd_mask])
        return (loss, outputs) if return_outputs else loss
