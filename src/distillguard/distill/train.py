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

This module is the driver (:func:`train`); the parts live by concern in ``train_config``
(:class:`TrainConfig`), ``student`` (pruned students), ``examples`` (token ids, labels, top-k
targets, batches), ``trainers`` (a Trainer per loss) and ``checkpoint`` (run fingerprints,
resuming, SIGTERM), and every name they define stays importable from here.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from distillguard.distill.checkpoint import (
    CHECKPOINT_MARK,
    CheckpointMarks,
    LogToLogger,
    StopOnSigterm,
    resume_point,
    run_fingerprint,
)
from distillguard.distill.evaluate import distinct_prompts, versions
from distillguard.distill.examples import (
    IGNORE,
    _byte_index,
    collate,
    kd_example,
    sft_example,
    topk_examples,
)
from distillguard.distill.student import (
    PRUNE_METHODS,
    block_distance,
    block_influence,
    layer_subset,
    load_student,
    mlp_importance,
    only_layers,
    parse_prune_spec,
    prune_layers,
    require_same_tokenizer,
    shrink_mlp,
)
from distillguard.distill.train_config import LOCAL_TEACHER_LOSSES, LOSSES, PRECISIONS, TrainConfig
from distillguard.distill.trainers import (
    EpochSeededLengthGroupedSampler,
    KDTrainer,
    LogitKDTrainer,
    SFTTrainer,
    answer_logits,
    shifted,
)
from distillguard.errors import ConfigError, IncompleteError
from distillguard.models import LoadedModel, load_model

# The split modules' names stay importable from here, where tests, bench scripts and users'
# scripts have always imported them.
__all__ = [
    "CHECKPOINT_MARK",
    "IGNORE",
    "LOCAL_TEACHER_LOSSES",
    "LOSSES",
    "PRECISIONS",
    "PRUNE_METHODS",
    "CheckpointMarks",
    "EpochSeededLengthGroupedSampler",
    "KDTrainer",
    "LogitKDTrainer",
    "ProgressCallback",
    "SFTTrainer",
    "StopOnSigterm",
    "TrainConfig",
    "_byte_index",
    "answer_logits",
    "block_distance",
    "block_influence",
    "collate",
    "kd_example",
    "layer_subset",
    "load_student",
    "mlp_importance",
    "only_layers",
    "parse_prune_spec",
    "prune_layers",
    "require_same_tokenizer",
    "resume_point",
    "run_fingerprint",
    "sft_example",
    "shifted",
    "shrink_mlp",
    "topk_examples",
    "train",
]


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
    stats: Counter = Counter()
    if loss in ("topk-kd", "auto"):
        try:
            examples = topk_examples(student, rows, config.max_length, stats)
            loss = "topk-kd"
        except ConfigError:
            if loss == "topk-kd":
                raise
            # auto: no top-k logprobs, or not in the student's vocabulary: plain SFT
    if examples is None:
        loss = "sft" if loss == "auto" else loss
        stats.clear()  # auto fell back to SFT: its counts, not top-k KD's
        examples = [
            sft_example(
                student,
                r["messages"],
                r["response"],
                config.max_length,
                capped=r.get("finish_reason") == "length",
                stats=stats,
            )
            for r in rows
        ]
    kept = [r for r, e in zip(rows, examples) if e is not None]
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ConfigError(
            f"no usable training examples in {data_dir}"
            + (
                f": the prompts of all {stats['dropped_long']} fill --max-length "
                f"{config.max_length}; raise it"
                if stats["dropped_long"] == len(rows)
                else ""
            )
        )
    lengths = length_report(config.max_length, len(rows), stats)
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
    # disable_tqdm makes the Trainer print every log dict ({'loss': ..., 'epoch': ...}) to stdout,
    # which a CLI whose stdout is its JSON summary must not do: they go to the log (-v) instead.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogToLogger())
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
        # the training set's rows left out or cut to fit --max-length, and why
        **lengths,
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
        "config": config.model_dump(),
        "run_fingerprint": fingerprint,
        "versions": versions(),
        "history": history,
        # the last logged loss (every 5 steps); a run shorter than that has only its mean
        "final_loss": history[-1]["loss"] if history else result.training_loss,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def length_report(max_length: int, rows: int, stats: Counter) -> dict:
    """How --max-length changed the training set: examples dropped (the prompt alone fills it),
    answers cut, rows without logprobs (top-k KD), and one line saying so for the user."""
    dropped, cut = stats["dropped_long"], stats["truncated"]
    parts = []
    if dropped:
        parts.append(
            f"dropped {dropped} of {rows} examples whose prompt alone fills --max-length "
            f"{max_length} (no answer token fits; raise --max-length to keep them)"
        )
    if cut:
        parts.append(f"cut {cut} answers at --max-length {max_length}")
    if stats["no_logprobs"]:
        parts.append(f"left out {stats['no_logprobs']} rows without harvested logprobs")
    return {
        "training_rows": rows,
        "dropped_over_max_length": dropped,
        "truncated_at_max_length": cut,
        "rows_without_logprobs": stats["no_logprobs"],
        "length_message": "; ".join(parts) or None,
    }


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
