"""Closed-mode radioactivity against SynthID keys: text written through one account's tournament
(a toy model over ASCII bytes, tokenised back with the tiny byte tokenizer) is traced to that
account and no other, through the same ``closed_test`` the CLI calls; open mode says it is not
implemented for SynthID."""

from __future__ import annotations

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.forensics.radioactivity import closed_test, open_test
from distillguard.models import load_tokenizer
from distillguard.watermark import WatermarkParams, account_key
from distillguard.watermark.scheme import SynthIDParams
from distillguard.watermark.synthid import SynthIDTopK

SECRET = b"radioactivity-synthid"
PARAMS = WatermarkParams(scheme="synthid", synthid=SynthIDParams(depth=12, top_k=64))
ASCII = 128


def _write(key, n_texts: int, length: int, seed: int) -> list[str]:
    """Texts sampled from a fixed random bigram model over printable ASCII, through the key's tournament."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(ASCII, ASCII, generator=g) * 2.0
    table[:, :32] = -1e9  # printable characters only: the text round-trips through the byte tokenizer
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


def test_open_mode_refuses_synthid():
    keys = [account_key(SECRET, "a", PARAMS)]
    with pytest.raises(ConfigError, match="not implemented for the synthid scheme"):
        open_test(None, keys, ["text"])
