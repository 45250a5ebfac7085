"""Tiny students for forensics tests: a few SFT steps on given answers."""

from __future__ import annotations

import copy

import torch

from distillguard.distill.train import collate, sft_example


def sft(base, prompts, answers, steps=80, seed=0):
    """A few SFT steps (the distillation trainer's own example builder and collator, a plain loop)."""
    lm = copy.copy(base)
    lm.model = copy.deepcopy(base.model).train()
    examples = [
        sft_example(lm, [{"role": "user", "content": p}], a, 256) for p, a in zip(prompts, answers)
    ]
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = collate(
            [examples[i] for i in torch.randperm(len(examples), generator=gen)[:8].tolist()],
            lm.tokenizer.pad_token_id,
        )
        lm.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.model.eval()
    return lm
