"""The linker's near-duplicate groups (linking.py): the numpy MinHash equals datasketch's, and the
band -> group index finds the groups that datasketch's MinHashLSH query + insert found."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash, MinHashLSH

from distillguard.arena import load_pools
from distillguard.detect.features import extract
from distillguard.detect.linking import _WORD, MAX_WORDS, NUM_PERM, Linker, minhash_signature


def _shingles(text: str) -> list[bytes]:
    words = text.lower().split()
    return [" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)]


def _prompts(n: int, seed: int) -> list[str]:
    """Real prompts, with edited near-copies of some of them (as templates and reposts make)."""
    rng = random.Random(seed)
    pool = [t.turns[0] for t in load_pools()["eval"] if len(t.turns[0].split()) >= 12][:n]
    out = list(pool)
    for p in rng.sample(pool, n // 3):
        words = p.split()
        i = rng.randrange(len(words))
        out.append(" ".join(words[:i] + [rng.choice(["please", "now", "x"])] + words[i + 1 :]))
    rng.shuffle(out)
    return out


def test_signature_equals_datasketch_minhash():
    for text in _prompts(200, 0)[:200] + ["a b c", "one two three four five six seven eight"]:
        sh = _shingles(text)
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(sh)
        assert np.array_equal(minhash_signature(sh), m.hashvalues), text


def test_groups_equal_those_of_minhash_lsh():
    """The old linker's grouping, written with datasketch's MinHashLSH: query, join the smallest
    group found (or a new one), insert. The index of band keys gives the same group per prompt."""
    lsh, groups, want, got = MinHashLSH(threshold=0.6, num_perm=NUM_PERM), {}, [], []
    linker = Linker()
    for seq, text in enumerate(_prompts(600, 1), 1):
        words = _WORD.findall(text[: 8 * MAX_WORDS].lower())[:MAX_WORDS]
        if len(words) < 8:
            continue
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)])
        group = min((groups[k] for k in lsh.query(m)), default=len(groups) + 1)
        lsh.insert(str(seq), m)
        groups[str(seq)] = group
        want.append(group)
        account = f"a{seq}"
        linker.observe(
            extract(
                {
                    "ts": seq,
                    "account": account,
                    "request": {"messages": [{"role": "user", "content": text}]},
                }
            )
        )
        ((_, g),) = linker._items["prompt"][account]
        got.append(g)
    assert got == want
    assert len(set(want)) < len(want) - 100  # near-copies were grouped: the test has teeth


def _chain_of_cliques(linker: Linker, cliques: int, size: int = 4) -> list[frozenset]:
    """Cliques of strongly linked accounts (weight 8), each tied to the next by one chance-level
    edge (weight 2.1): one connected component, whose communities are the cliques."""
    want = []
    for c in range(cliques):
        members = [f"c{c:03d}-{i}" for i in range(size)]
        want.append(frozenset(members))
        for i, x in enumerate(members):
            for y in members[i + 1 :]:
                linker._adj[x][y] = linker._adj[y][x] = 8.0
        if c:
            x, y = f"c{c - 1:03d}-0", members[0]
            linker._adj[x][y] = linker._adj[y][x] = 2.1
        linker._dirty.update(members)
        for x in members:  # scored as the edges arrive, as the monitor does
            linker.community(x)
    return want


def test_a_giant_component_is_repartitioned_around_the_change(monkeypatch):
    """Above EXACT_COMPONENT accounts only the changed account's neighbourhood is re-partitioned
    (the cost of a change stays bounded as chance edges chain a population into one component);
    the communities are the same as the exact recomputation finds, and stay a partition."""
    from distillguard.detect import linking

    exact = Linker()
    want = _chain_of_cliques(exact, 40)
    assert {exact.community(x) for c in want for x in c} == set(want)
    monkeypatch.setattr(linking, "EXACT_COMPONENT", 10)
    calls = []
    real = linking.communities
    monkeypatch.setattr(
        linking, "communities", lambda edges: calls.append(len(edges)) or real(edges)
    )
    local = Linker()
    assert _chain_of_cliques(local, 40) == want
    assert {local.community(x) for c in want for x in c} == set(want)
    for x, c in local._community.items():  # a partition: every member maps to the same set
        assert x in c and all(local._community[y] == c for y in c)
    assert max(calls) < 30  # a few cliques' edges per change, never the 40 cliques' 280
