"""A small n-gram "language" where the watermark's truth is known, for the training-data filter's
checks (tests/forensics/test_radioactivity_filter.py, bench/radioactivity_filter.py).

Tokens are one-byte tokens of the tiny tokenizer (letters), so texts go through the real
``closed_test``; the teacher is a fixed random table of next-token logits per ``width``-token
context; an account's data is the teacher sampled under its keyed-hash green list
(p ∝ q·e^{δ·green}, the soft watermark, at every position). Suspects:

- the language itself, unwatermarked: a model that never saw the data but writes its phrases;
- a memoriser: it samples from a data set's own (width + 1)-gram counts, a student that learned
  exactly that data and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillguard.watermark import WatermarkParams, is_green


@dataclass
class NgramLanguage:
    params: WatermarkParams
    letters: int = 26  # 'a'.. : one byte, one token of the tiny tokenizer
    length: int = 40
    seed: int = 0

    def __post_init__(self):
        gen = torch.Generator().manual_seed(self.seed)
        self.width = self.params.context_width
        self.ids = torch.arange(97, 97 + self.letters)
        self.logits = torch.randn(*[self.letters] * (self.width + 1), generator=gen) * 1.5

    def greens(self, hash_key: int) -> torch.Tensor:
        """0/1 of every (context, token) under this key, shaped like ``logits``."""
        grid = torch.cartesian_prod(*[self.ids] * (self.width + 1)).reshape(-1, self.width + 1)
        green = is_green(self.params, hash_key, grid[:, : self.width], grid[:, self.width], 259)
        return green.reshape(self.logits.shape).double()

    def sample(self, table: torch.Tensor, n: int, seed: int) -> list[str]:
        """n texts from a table of next-token logits (``logits``' shape)."""
        gen = torch.Generator().manual_seed(seed)
        probs = table.softmax(-1).reshape(-1, self.letters)  # (letters**width, letters)
        place = self.letters ** torch.arange(self.width - 1, -1, -1)  # context -> row of probs
        rows = list(torch.randint(self.letters, (self.width, n), generator=gen))
        for _ in range(self.length - self.width):
            ctx = (torch.stack(rows[-self.width :], 1) * place).sum(1)
            rows.append(torch.multinomial(probs[ctx], 1, generator=gen)[:, 0])
        return ["".join(chr(97 + i) for i in s) for s in torch.stack(rows, 1).tolist()]

    def unwatermarked(self, n: int, seed: int) -> list[str]:
        return self.sample(self.logits, n, seed)

    def watermarked(self, hash_key: int, n: int, seed: int) -> list[str]:
        return self.sample(self.logits + self.params.delta * self.greens(hash_key), n, seed)

    def memoriser(self, data: list[str], n: int, seed: int) -> list[str]:
        """Texts of a student of exactly ``data``: its (width + 1)-gram counts, nothing else."""
        counts = torch.full(self.logits.shape, 1e-9)
        for text in data:
            s = [ord(ch) - 97 for ch in text]
            for j in range(self.width, len(s)):
                counts[tuple(s[j - self.width : j + 1])] += 1
        return self.sample(counts.log(), n, seed)
