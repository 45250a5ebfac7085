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

from scipy import stats

from distillguard.detect.registry import Detector, register


@register
class FreshDetector(Detector):
    name = "fresh"

    def __init__(self, context):
        super().__init__(context)
        self._n = 0        # requests
        self._fresh = 0    # ... that open a conversation (no earlier turns)

    def observe(self, f, embedding) -> None:
        self._n += 1
        self._fresh += not f.continues

    def score(self) -> float:
        n, f = self._n, self._fresh
        if 2 * f <= n:   # at most half fresh: P >= 1/2, no evidence (and no scipy call per request)
            return 0.0
        return float(-stats.binom.logsf(f - 1, n, 0.5) / math.log(10))   # -log10 P(X >= f)

    def reasons(self) -> list[str]:
        if not self._fresh:
            return []
        return [f"opened {self._fresh} conversations over its life and continued {self._n - self._fresh} "
                f"times: a sweep of fresh prompts"]
