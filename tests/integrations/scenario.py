"""One continuous-batching scenario run through the vLLM plugin's batch state and through our
engine's own step (``RowEmission._choose``), compared bit for bit.

Runs in either environment: the main one (``WatermarkRows`` with plain stand-ins for vLLM's
``BatchUpdate`` and ``SamplingParams``) and vLLM's (``python -m tests.integrations.scenario``:
the real ``WatermarkLogitsProcessor``, vLLM's ``BatchUpdate``, ``MoveDirectionality`` and
``SamplingParams``, validated by the processor's ``validate_params``).

Requests of every built-in scheme (and a boosted δ, and rows with no key) join, leave, move
and swap slots mid-batch with different temperatures, top-p, penalties and greedy rows, over
a vocabulary larger than keyed-hash's 1,024 candidates; some logits are -inf (filtered
tokens). One keyed SynthID request is preempted (removed with tokens already generated) and
resumed two steps later in another slot, as vLLM re-adds a preempted request with its output so
far: its context must come from that output, not from the slot. At each step both sides get the same logits; the engine's tokens are fed back to
both (vLLM hands the processor a live reference to each request's output list: the same list
object here).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from distillguard.serve import emission
from distillguard.serve.emission import RowEmission
from distillguard.serve.jobs import GenParams, Job, Row
from distillguard.serve.keymaterial import XARG, Sampler, encode
from distillguard.serve.sampling import sampling_logprobs
from distillguard.watermark import WatermarkParams, account_key

VOCAB = 4096
SECRET = b"scenario-secret-0123456789abcdef"


class Engine(RowEmission):
    """Our engine's last step with no model behind it: ``_choose`` needs only these."""

    def __init__(self, vocab: int):
        self.lm = SimpleNamespace(device=torch.device("cpu"), eos_token_ids=frozenset())
        self.antidistill = None
        self._tap = None
        self._token_text = [f"<{i}>" for i in range(vocab)]
        self._token_bytes = [b"x"] * vocab
        self._special = set()


@dataclass
class Request:
    name: str
    row: Row  # the engine's; row.out_ids is also the list vLLM's side sees
    params: object  # what vLLM's side gets as SamplingParams
    keyed: bool


def keys() -> dict:
    kh = WatermarkParams()
    return {
        "keyed-hash": account_key(SECRET, "acct-a", kh),
        "boost": account_key(SECRET, "acct-a", replace(kh, delta=4.0)),
        "lefthash-ref": account_key(SECRET, "acct-b", WatermarkParams(scheme="lefthash-ref")),
        "synthid": account_key(SECRET, "acct-c", WatermarkParams(scheme="synthid")),
        "keyed-hash-all": account_key(
            SECRET, "acct-d", WatermarkParams(candidates=VOCAB, min_entropy=0.0)
        ),
    }


def make_request(name, key, prompt, sampler: Sampler, seed, make_params) -> Request:
    gen = GenParams(
        max_new_tokens=1000,
        temperature=sampler.temperature,
        top_p=sampler.top_p,
        presence_penalty=sampler.presence_penalty,
        frequency_penalty=sampler.frequency_penalty,
        watermark=key,
    )
    job = Job(prompt_ids=list(prompt), params=gen, n=1, sink=lambda event: None)
    g = torch.Generator().manual_seed(seed)
    extra = {XARG: encode(key, sampler)} if key is not None else None
    # vLLM's side: a neutral sampler where keyed (the plugin applies the request's own)
    if key is not None:
        temperature, top_p, pres, freq = (0.0 if sampler.temperature == 0 else 1.0), 1.0, 0.0, 0.0
    else:
        temperature, top_p = sampler.temperature, sampler.top_p
        pres, freq = sampler.presence_penalty, sampler.frequency_penalty
    params = make_params(
        temperature=temperature,
        top_p=top_p,
        presence_penalty=pres,
        frequency_penalty=freq,
        extra_args=extra,
    )
    return Request(name, Row(job, 0, g), params, key is not None)


def run(processor, make_update, make_params, swap, unidirectional) -> dict:
    """Drive ``processor`` (update_state/apply) and the engine through the scenario; raises
    AssertionError at the first difference. Returns what was compared."""
    k = keys()
    eng = Engine(VOCAB)
    gen = torch.Generator().manual_seed(1234)
    prompt = lambda n: torch.randint(0, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    mk = lambda *a: make_request(*a, make_params)  # noqa: E731
    slots: list[Request | None] = []
    recorded: list[torch.Tensor] = []
    real_sample_rows = emission.sample_rows

    def spy(logprobs, temperature, generators):  # record what the engine samples from
        recorded.append(logprobs.clone())
        return real_sample_rows(logprobs, temperature, generators)

    synthid = mk("synthid", k["synthid"], prompt(9), Sampler(1.0), 3)
    # (step, removed, added [(slot, request)], moved [(a, b, kind)])
    plan = {
        0: (
            [],
            [
                (0, mk("kh", k["keyed-hash"], prompt(7), Sampler(0.7, 0.9), 1)),
                (1, mk("plain", None, prompt(5), Sampler(0.8), 2)),
                (2, synthid),
                (3, mk("lefthash", k["lefthash-ref"], prompt(1), Sampler(0.0, 1.0, 0.5), 4)),
            ],
            [],
        ),
        2: (
            [1],
            [(1, mk("boost", k["boost"], prompt(4), Sampler(0.8, 1.0, 0.0, 0.3), 5))],
            [],
        ),
        3: ([0], [], [(3, 0, unidirectional)]),
        4: ([], [], [(0, 2, swap)]),
        5: (
            [],
            [
                (3, mk("synthid-greedy", k["synthid"], prompt(2), Sampler(0.0), 6)),
                (4, mk("plain-2", None, prompt(3), Sampler(1.0), 7)),
                (5, mk("all-vocab", k["keyed-hash-all"], prompt(3), Sampler(1.2, 0.5, -0.4), 8)),
            ],
            [],
        ),
        7: ([4], [], [(5, 4, unidirectional)]),
        # preempted: synthid (slot 0 since step 4's swap) leaves with its output so far, the
        # last row fills its slot; resumed at step 10 in the last slot
        8: ([0], [], [(4, 0, unidirectional)]),
        10: ([], [(4, synthid)], []),
    }
    compared = {
        "keyed_rows": 0,
        "plain_rows": 0,
        "steps": 0,
        "unpenalised": 0,
        "changed": set(),
        "resumed_rows": 0,
    }
    preempted_at = None
    emission.sample_rows = spy
    try:
        for step in range(13):
            removed, added, moved = plan.get(step, ([], [], []))
            for i in removed:
                if slots[i] is synthid:
                    preempted_at = len(synthid.row.out_ids)
                slots[i] = None
            for i, req in added:
                slots.extend([None] * (i + 1 - len(slots)))
                slots[i] = req
            for a, b, kind in moved:
                if kind is swap:
                    slots[a], slots[b] = slots[b], slots[a]
                else:
                    slots[b], slots[a] = slots[a], None
            while slots and slots[-1] is None:
                slots.pop()
            assert all(s is not None for s in slots), f"step {step}: holes in the batch {slots}"
            batch = [(i, r.params, list(r.row.job.prompt_ids), r.row.out_ids) for i, r in added]
            update = (
                make_update(len(slots), removed, batch, moved)
                if (removed or added or moved)
                else None
            )
            processor.update_state(update)
            # flat and peaked steps: keyed-hash leaves the peaked rows alone (min_entropy)
            logits = torch.randn(len(slots), VOCAB, generator=gen) * (1.5 if step % 2 else 3.0)
            logits[:, 17] = float("-inf")
            out = processor.apply(logits.clone())
            recorded.clear()
            chosen = eng._choose([r.row for r in slots], logits.clone())
            engine_lp = recorded[0]
            plain = sampling_logprobs(
                logits,
                torch.tensor([r.row.job.params.temperature for r in slots]),
                torch.tensor([r.row.job.params.top_p for r in slots]),
            )
            for b, r in enumerate(slots):
                if r.keyed:
                    assert torch.equal(out[b], engine_lp[b]), (
                        f"step {step}: row {b} ({r.name}) differs from the engine: max |diff| "
                        f"{(out[b] - engine_lp[b]).abs().nan_to_num(0).max()}"
                    )
                    compared["keyed_rows"] += 1
                    if r is synthid and preempted_at is not None:
                        assert len(r.row.out_ids) >= preempted_at > 0
                        compared["resumed_rows"] += 1
                    p = r.row.job.params
                    if not (p.presence_penalty or p.frequency_penalty):
                        # the watermark did something (else equality would prove little)
                        compared["unpenalised"] += 1
                        if not torch.equal(out[b], plain[b]):
                            compared["changed"].add(r.name)
                else:
                    assert torch.equal(out[b], logits[b]), f"step {step}: plain row {b} touched"
                    compared["plain_rows"] += 1
            assert len(chosen) == len(slots)
            compared["steps"] += 1
    finally:
        emission.sample_rows = real_sample_rows
    compared["changed"] = sorted(compared["changed"])
    return compared


def run_plain() -> dict:
    """The scenario on ``WatermarkRows`` with plain stand-ins for vLLM's types."""
    from distillguard.integrations.rows import WatermarkRows

    class Processor:
        def __init__(self):
            self.rows = WatermarkRows()

        def update_state(self, update):
            if update is not None:
                self.rows.update(update.removed, update.added, update.moved)

        def apply(self, logits):
            return self.rows.apply(logits)

    swap, uni = SimpleNamespace(name="SWAP"), SimpleNamespace(name="UNIDIRECTIONAL")
    return run(
        Processor(),
        lambda n, removed, added, moved: SimpleNamespace(
            batch_size=n, removed=removed, added=added, moved=moved
        ),
        SimpleNamespace,
        swap,
        uni,
    )


def run_vllm() -> dict:
    """The scenario on the real vLLM processor with vLLM's own types."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from distillguard.integrations.vllm import WatermarkLogitsProcessor

    def make_params(**kw):
        params = SamplingParams(max_tokens=1000, **kw)
        WatermarkLogitsProcessor.validate_params(params)
        return params

    proc = WatermarkLogitsProcessor(None, torch.device("cpu"), False)
    return run(
        proc,
        lambda n, removed, added, moved: BatchUpdate(
            batch_size=n, removed=removed, added=added, moved=moved
        ),
        make_params,
        MoveDirectionality.SWAP,
        MoveDirectionality.UNIDIRECTIONAL,
    )


if __name__ == "__main__":
    result = run_vllm() if "--vllm" in sys.argv else run_plain()
    print(json.dumps(result))
