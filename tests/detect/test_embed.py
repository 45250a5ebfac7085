"""The prompt embedder: the split forward pass (``workers > 1``) gives the vectors ``encode`` does."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from distillguard.arena.pools import load_pools
from distillguard.detect.embed import MIN_SPLIT, Embedder
from distillguard.errors import ConfigError


def test_split_forward_matches_encode_and_is_thread_safe(embedder):
    texts = [t.user_turns[0] for t in load_pools()["eval"][: 5 * MIN_SPLIT]]
    split = Embedder(workers=3)
    got = split.embed(texts)
    want = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert got.shape == want.shape
    assert np.min(np.sum(got * want, axis=1)) > 1 - 1e-5
    # callers on several threads at once (the gateway embeds off the request path) share one
    # tokenizer, which refuses concurrent use: the split path serialises it
    more = [t.user_turns[0] + " (again)" for t in load_pools()["eval"][: 4 * MIN_SPLIT]]
    results: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, split.embed(more[i::2])))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        ref = embedder.model.encode(more[i::2], normalize_embeddings=True, convert_to_numpy=True)
        assert np.min(np.sum(results[i] * ref, axis=1)) > 1 - 1e-5
    with pytest.raises(ConfigError):
        Embedder(workers=0)
