"""Radioactivity against SynthID keys.

Closed mode: text written through one account's tournament (a toy model over ASCII bytes,
tokenised back with the tiny byte tokenizer) is traced to that account and no other, through the
same ``closed_test`` the CLI calls.

Open mode, truth known both ways: the tiny model as it is (clean: its distribution does not
depend on any key) is flagged by no more keys than α allows, over many keys; the same model with
one account's tournament applied to its next-token distribution at every position (a suspect
that learned the watermark perfectly) is traced to that account and no other.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from distillguard.forensics.radioactivity import closed_test, generate_answers, open_test
from distillguard.models import load_model, load_tokenizer
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.scheme import SynthIDParams
from distillguard.watermark.synthid import (
    SynthIDTopK,
    candidate_hashes,
    processor_for,
    table_indices,
)
from tests.forensics.test_radioactivity import PrintableOnly
from tests.servers import run_cli

SECRET = b"radioactivity-synthid"
PARAMS = WatermarkParams(scheme="synthid", synthid=SynthIDParams(depth=12, top_k=64))
ASCII = 128


def _write(key, n_texts: int, length: int, seed: int) -> list[str]:
    """Texts sampled from a fixed random bigram model over printable ASCII, through the key's tournament."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(ASCII, ASCII, generator=g) * 2.0
    table[
        :, :32
    ] = -1e9  # printable characters only: the text round-trips through the byte tokenizer
    proc = SynthIDTopK(key.hash_key, PARAMS.synthid)
    texts = []
    for _ in range(n_texts):
        ids = torch.randint(32, ASCII, (1, 4), generator=g)
        for _ in range(length):
            probs = proc(ids, table[ids[:, -1]]).softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
        texts.append(bytes(ids[0].tolist()).decode("ascii"))
    return texts


def test_closed_mode_traces_synthid_text_to_its_account():
    tok = load_tokenizer("tiny")
    keys = [account_key(SECRET, f"acct-{i}", PARAMS) for i in range(6)]
    texts = _write(keys[2], n_texts=4, length=60, seed=1)
    result = closed_test(keys, texts, tok)
    assert result.traced == ["acct-2"]
    assert result.gamma == 0.5 and result.scored > 500
    clean = closed_test(keys, _write(account_key(SECRET, "nobody", PARAMS), 4, 60, seed=2), tok)
    assert clean.traced == []


class Tilted(torch.nn.Module):
    """A suspect whose next-token distribution at every position is the key's tournament applied
    to the base model's (what a student that learned the watermark perfectly would predict)."""

    def __init__(self, model, proc: SynthIDTopK):
        super().__init__()
        self.model, self.proc = model, proc

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits.float().log_softmax(-1)  # (B, T, V)
        start = self.proc.params.ngram_len - 2  # the first position with a full hash context
        tilted = logits.clone()
        for t in range(start, logits.shape[1]):
            tilted[:, t] = self.proc(input_ids[:, : t + 1], logits[:, t])
        out.logits = tilted
        return out


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread spins least
    try:
        yield load_model("tiny", device="cpu")
    finally:
        torch.set_num_threads(threads)


PROMPTS = [
    f"question {i}: tell me about {t}"
    for i, t in enumerate(["cats", "rain", "tea", "ships", "jazz", "bread"] * 2)
]


def test_open_mode_traces_a_suspect_tilted_by_one_accounts_tournament(tiny):
    keys = [account_key(SECRET, f"acct-{i}", PARAMS) for i in range(6)]
    suspect = copy.copy(tiny)
    suspect.model = Tilted(tiny.model, SynthIDTopK(keys[4].hash_key, PARAMS.synthid)).eval()
    # its own answers: the tilted distribution sampled (T = 1), as a student that learned it would answer
    answers = generate_answers(
        tiny,
        PROMPTS,
        max_new_tokens=40,
        temperature=1.0,
        seed=1,
        progress=False,
        after_temperature=[SynthIDTopK(keys[4].hash_key, PARAMS.synthid), PrintableOnly()],
    )
    result = open_test(
        suspect, keys, answers, prompts=PROMPTS, exclude=PROMPTS, null_keys=100, progress=False
    )
    assert result.test == "g-mass-chernoff" and result.gamma == 0.5 and result.scored > 200
    assert result.traced == ["acct-4"]
    by = {k.account: k for k in result.keys}
    assert by["acct-4"].log10_p < -10 and by["acct-4"].extra["empirical_p"] == pytest.approx(
        1 / 101
    )
    assert by["acct-4"].green_fraction > result.null["green_fraction_mean"] + 0.05
    assert by["acct-4"].extra["top1_log10_p"] < -3  # the reading-mode test sees it too
    assert abs(result.null["green_fraction_mean"] - 0.5) < 0.02  # wrong keys: fair coins


def test_open_mode_false_positive_rate_across_many_keys(tiny):
    """The clean model on its own answers: the rate of p <= α over 300 wrong keys stays within
    sampling error, for the Chernoff p-value and the top-1 binomial test."""
    keys = [account_key(b"another secret", f"other-{i}", PARAMS) for i in range(300)]
    answers = generate_answers(
        tiny,
        PROMPTS,
        max_new_tokens=40,
        temperature=0.7,
        seed=3,
        progress=False,
        after_temperature=[PrintableOnly()],
    )
    res = open_test(
        tiny, keys, answers, prompts=PROMPTS, exclude=PROMPTS, null_keys=0, progress=False
    )
    chernoff = np.array([k.p_value for k in res.keys])
    top1 = np.array([10 ** k.extra["top1_log10_p"] for k in res.keys])
    for name, p in (("chernoff", chernoff), ("top-1", top1)):
        for alpha in (0.01, 0.05):
            rate = float((p <= alpha).mean())
            # binomial sampling error over 300 keys (keys share the text, so allow 4 sd)
            assert rate <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / len(keys)), (
                name,
                alpha,
                rate,
            )
        assert float(p.mean()) > 0.4, name  # not piled up near 0
    z = np.array([k.z for k in res.keys])
    assert abs(z.mean()) < 0.5 and 0.3 < z.std() < 1.5  # the mass is centred on 1/2 across keys


def test_table_indices_match_transformers():
    """The open-mode statistic's hashing (candidate_hashes, table_indices) is transformers'."""
    proc = processor_for(account_key(SECRET, "a", PARAMS).hash_key, PARAMS.synthid)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 259, (7, PARAMS.synthid.ngram_len - 1), generator=g)
    cand = torch.randint(0, 259, (7, 5), generator=g)
    ours = table_indices(
        candidate_hashes(ctx, cand), proc.keys, PARAMS.synthid.table_size
    )  # (7, 5, depth)
    grams = torch.cat([ctx[:, None, :].expand(-1, 5, -1), cand[:, :, None]], dim=-1).reshape(
        1, 35, -1
    )
    theirs = proc.compute_ngram_keys(grams)[0] % PARAMS.synthid.table_size  # (35, depth)
    assert torch.equal(ours.reshape(35, -1), theirs)


def test_cli_open_mode_synthid(tmp_path):
    """`forensics radioactivity --mode open --scheme synthid` on the clean tiny model: the SynthID
    statistic runs end to end (its own answers, prompts excluded) and traces to no account."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:6]))
    out = run_cli(
        "forensics",
        "radioactivity",
        "--suspect",
        "tiny",
        "--mode",
        "open",
        "--scheme",
        "synthid",
        "--accounts",
        "acme,globex",
        "--prompts",
        str(prompts),
        "--tokenizer",
        "tiny",
        "--max-tokens",
        "24",
        "--null-keys",
        "20",
        "--device",
        "cpu",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": "cli-secret", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (
        result["mode"] == "open" and result["test"] == "g-mass-chernoff" and result["gamma"] == 0.5
    )
    assert result["traced"] == [] and result["scored"] > 50 and result["null"]["keys"] == 20
    assert {k["account"] for k in result["keys"]} == {"acme", "globex"}
    assert "cli-secret" not in out.stdout + out.stderr
