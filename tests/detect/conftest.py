"""Fixtures of the detection tests: MiniLM loaded once per session, unit embeddings with known topics."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def embedder():
    from distillguard.detect.embed import shared_embedder

    return shared_embedder()


def topic_embeddings(
    rng: np.random.Generator, topics: np.ndarray, n: int, spread: float = 0.35
) -> np.ndarray:
    """n unit vectors around the given topic centres (rows of ``topics``), one centre per row drawn."""
    which = rng.integers(0, len(topics), size=n)
    x = topics[which] + spread * rng.normal(size=(n, topics.shape[1])) / np.sqrt(topics.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def space():
    """A toy topic space: 16 unit centres in 32 dimensions."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(16, 32))
    return c / np.linalg.norm(c, axis=1, keepdims=True)
