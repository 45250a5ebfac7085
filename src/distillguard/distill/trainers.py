"""The Hugging Face Trainer subclasses behind each loss: SFT, top-k KD, and full-logit KD / GKD
from a local teacher; the output layer applied only where a loss is taken."""

from __future__ import annotations

import random

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from distillguard.distill.examples import IGNORE
from distillguard.distill.losses import (
    generalized_jsd_loss,
    previous_token_candidates,
    topk_kd_loss,
    unlikelihood_loss,
)


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
