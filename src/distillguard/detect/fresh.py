"""Fresh conversations over an account's life: many opened, few continued.

A slow-and-low harvester sends at a person's pace, hours and parameters, but every prompt opens a
new conversation on a new subject and none is ever followed up: extraction needs many distinct
prompts, and a follow-up buys little new data. People open a few conversations a session and
continue most of them; the benign users who never follow up (one question per conversation) open
far fewer over days. Neither the window detectors (the last 64 embedded prompts) nor the daily
volume see this: the evidence is in the count, and it only piles up over days.

Statistic, from running counts kept for the account's whole life (so the online monitor and the
offline report agree, and a 3-day benign history is calibrated the same way): of n requests, f
open a conversation; the score is -log10 P(Bin(n, 1/2) >= f), how unlikely that many fresh
requests are for someone who continues a conversation as often as they start one (ShareGPT users
send ~3 turns a conversation, so 1/2 is generous). It grows with the count only while nearly
every request is fresh: a heavy user who follows up stays at 0 however much they send (a count
such as f·f/n would grow with volume for them too, and volume is a detector of its own: Fisher
assumes independent evidence and would count one heavy user twice).
Its benign distribution (account-day maxima: one-shot users, heavy users over 3 days) comes from
calibration like every detector's; it cannot flag alone (calibrate.tail_floor).

Where it is weak: a benign API integration that sends single-turn requests at volume (a
classifier, a batch summariser) looks exactly like this; the evaluation's benign users replay
chat conversations, so they do not include such a client.
"""

from __future__ import annotations

import math

from scipy import special

from distillguard.detect.registry import Detector, register


def binomial_evidence(f: int, n: int) -> float:
    """-log10 P(Bin(n, 1/2) >= f); 0 when f <= n/2 (no evidence). scipy's ``bdtrc`` (a C ufunc,
    ~1 us; ``stats.binom.logsf`` took 1.6 ms, as much as the rest of a request); where the tail
    underflows (n beyond ~1,000) the Chernoff bound n·KL(f/n || 1/2), which is within
    O(log n) of it."""
    if 2 * f <= n:
        return 0.0
    p = float(special.bdtrc(f - 1, n, 0.5))  # P(X > f - 1)
    if p > 0.0:
        return -math.log10(p)
    q = f / n
    kl = q * math.log(2 * q) + ((1 - q) * math.log(2 * (1 - q)) if q < 1 else 0.0)
    return n * kl / math.log(10)


@register
class FreshDetector(Detector):
    name = "fresh"

    def __init__(self, context):
        super().__init__(context)
        self._n = 0  # requests
        self._fresh = 0  # ... that open a conversation (no earlier turns)
        self._score = 0.0  # of the counts above (score() is read after every request)

    def observe(self, f, embedding) -> None:
        self._n += 1
        self._fresh += not f.continues
        self._score = binomial_evidence(self._fresh, self._n)

    def score(self) -> float:
        return self._score

    def reasons(self) -> list[str]:
        if not self._fresh:
            return []
        return [
            f"opened {self._fresh} conversations over its life and continued {self._n - self._fresh} "
            f"times: a sweep of fresh prompts"
        ]
