"""``TrainConfig``: every setting of a training run, with its help text, validated where it is built.

The CLI's ``distill train`` options take their defaults and help from these fields, and the
pipeline's ``train:`` section takes the same names.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig, Number, flag
from distillguard.errors import ConfigError

LOSSES = ("auto", "sft", "topk-kd", "kd", "gkd")
LOCAL_TEACHER_LOSSES = ("kd", "gkd")  # need the teacher's logits, computed here
PRECISIONS = ("fp32", "bf16", "tf32")


class TrainConfig(DistillConfig):
    data: str = Field(description="curated dataset directory (from `distill curate`)")
    out: str = Field(description="where to save the student (a save_pretrained directory)")
    # 15 of the teacher's 30 layers, their MLPs cut to 896 of 1,536 neurons: 0.46-0.49 of its CPU
    # per token, 0.13-0.22 nats better than 11 whole layers at about the same cost (docs/decisions/default-student.md,
    # bench/distill_curves.py)
    student: str = Field(
        "prune:15:mlp896",
        description="prune:K[:influence|block|even][:mlpW] (K of the teacher's layers; mlpW: "
        "MLPs cut to their W most active neurons) | tiny | HF id | DIR | FILE.gguf",
    )
    teacher: str = Field(
        "smollm2",
        description="local teacher: what prune:K starts from, and the logits of kd/gkd (also "
        "the tokenizer of the harvested logprobs)",
    )
    # top-k KD led SFT at every measured point (docs/decisions/topk-kd-loss.md)
    loss: str = Field(
        "auto",
        description="auto (topk-kd where the data has top-k logprobs the student can read, "
        "else sft) | sft | topk-kd (harvested --top-logprobs) | kd (full logits of the local "
        "--teacher) | gkd (on-policy: the student answers, the teacher scores); "
        "the KD losses need the teacher's tokenizer",
    )
    # DistillKit's alpha, the other way round. The API's top-k leaves the rest of the distribution
    # lumped in one tail bucket; the sampled token says where some of it went.
    ce_weight: Number = Field(
        0.0,
        description="topk-kd: share of the loss that is cross-entropy on the teacher's "
        "sampled tokens (the rest the top-k KL); 0 top-k KL only",
    )
    # The default 1 for sft/topk-kd: from 4,000 queries it took rep4 0.36 -> 0.15 for 0.08 nats
    # (docs/distillation.md).
    unlikelihood: Number | None = Field(
        None,
        description="sft/topk-kd: weight of token-level unlikelihood on the "
        "tokens the answer already wrote (against loops; Welleck "
        "et al. 2019); default 1 (0 for kd/gkd); 0 off",
    )
    lora: bool = Field(False, description="train LoRA adapters (PEFT), merged into the saved model")
    lora_r: int = Field(16, description="LoRA rank (alpha is twice it)")
    epochs: Number = Field(2.0, description="passes over the training set")
    # the learning curves' setting (docs/distillation.md): the defaults are the measured configuration
    lr: Number = Field(
        5e-4,
        description="peak learning rate (cosine schedule); 5e-4 is what the learning curves "
        "(docs/distillation.md) used",
    )
    batch_size: int = Field(8, description="examples per step")
    grad_accum: int = Field(1, description="batches per optimiser step (gradient accumulation)")
    max_length: int = Field(512, description="tokens per example at most")
    seed: int = Field(0, description="random seed")
    max_train: int | None = Field(None, description="use at most this many training examples")
    beta: Number | None = Field(
        None,
        description="kd/gkd: generalised JSD weight, 0 forward KL .. 1 reverse KL "
        "(default: kd 0, gkd 0.5)",
    )
    lmbda: Number = Field(
        0.5, description="gkd: share of batches answered by the student itself (on-policy)"
    )
    gen_max_new_tokens: int = Field(64, description="gkd: length of the student's own answers")
    gen_temperature: Number = Field(
        1.0, description="gkd: sampling temperature of the student's own answers"
    )
    save_steps: int = Field(
        100, description="checkpoint every this many steps into OUT/checkpoints (0: never)"
    )
    resume: bool = Field(
        True,
        description="continue from the last checkpoint of this same run in OUT/checkpoints "
        "(after a crash), or do nothing when OUT holds its finished student",
    )
    # Speed (the same loss either way; bench/distill_train_speed.py measures both settings side by
    # side):
    group_by_length: bool = Field(
        True,
        description="batches of similar lengths (HF's LengthGroupedSampler): less padding",
    )
    sparse_logits: bool = Field(
        True,
        description="output layer only where a loss is taken (the answer), not over the prompt",
    )
    # The learning curves (docs/distillation.md): fp32 on CPUs, tf32 on an H200, which reproduced a CPU point to 0.01
    # nats (bench/results/distill_curves_gpu.json).
    precision: str = Field(
        "fp32",
        description="fp32 | bf16 (mixed precision, float32 master weights) | tf32 "
        "(float32 with TF32 matrix products; NVIDIA Ampere or newer)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
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
                raise ConfigError(f"{flag(name)} {getattr(self, name)}: use 1 or more")
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(
                f"--max-train {self.max_train}: use 1 or more (or leave it out for all examples)"
            )
        if self.student.startswith("prune:"):
            # here, not where the model is built: torch stays out of the CLI's start-up
            from distillguard.distill.student import parse_prune_spec

            # a typo fails here, not after the teacher is loaded (or harvested)
            parse_prune_spec(self.student)
        return self

    @property
    def unlikelihood_weight(self) -> float:
        if self.unlikelihood is not None:
            return self.unlikelihood
        return 0.0 if self.loss in LOCAL_TEACHER_LOSSES else 1.0

    @property
    def jsd_beta(self) -> float:
        return self.beta if self.beta is not None else (0.0 if self.loss == "kd" else 0.5)
