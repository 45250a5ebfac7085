"""Cross-account linking as weighed evidence (issue 23), not transitive closure.

Items. Every account holds sets of items of four kinds:

- ``prompt``: a near-duplicate group (MinHash LSH on word 3-shingles, Jaccard ≥ 0.6; datasketch),
  or, for a ledger kept as hashes, an identical-prompt hash;
- ``template``: a template signature the account used at least 3 times;
- ``system``: a system-prompt hash;
- ``network``: the /24 (IPv4) or /48 (IPv6) the account sent from.

Templates and system prompts that several benign reference accounts share (``common``) are no
evidence; an item held by more than ``MAX_SHARERS`` accounts stops making pairs (it carries almost
no evidence, and each new holder would cost O(holders)).

Pair significance. The null hypothesis: two accounts choose their items independently of each
other, each account's n distinct items of a kind being n draws from the population's popularity,
where one draw is item i with probability r_i = (d_i' + 1) / (D' + U): d_i' accounts *other than
the pair* hold i, D' = D - n_a - n_b is the kind's incidences outside the pair, U its distinct
items (add-one: an item nobody else holds is not impossible). Then P(b holds i) ≤ n_b r_i, and
the count K of a's items that b also holds has mean at most

    λ(a→b) = n_b Σ_{i∈A} r_i = n_b (R_a - K) / (D' + U),      R_a = Σ_{i∈A} d_i,

a Poisson-binomial that Le Cam's theorem puts close to Poisson(λ) (error ≤ Σ π_i²); the tail
p = P(Poisson(λ) ≥ K) with the linear upper bound on λ is conservative. So a popular item raises
λ for everyone who holds it (a prompt many people send proves little: its evidence, -log10 of the
chance b holds it, is an IDF), and a big account raises it for all its partners (a sweeper over a
public prompt set is expected to meet people who type the same prompts). Both directions are
tested and the larger p kept; the kinds both accounts hold combine by Fisher's method (χ² with 2k
degrees of freedom). A pair's weight is w = -log10 p; pairs under ``EDGE_MIN`` are no edge.

Communities. Leiden with the constant Potts model (Traag, Van Dooren, Nesterov 2011; Traag,
Waltman, van Eck 2019; ``leidenalg``) at resolution ``EDGE_MIN``: a community needs a mean pairwise
weight of at least ``EDGE_MIN`` among all its pairs. A hub linked to many accounts that are not
linked to each other (a star of L leaves has density 2w/(L+1)) does not merge them; a campaign
whose keys all share evidence is one community. Recomputed per connected component when its
edges change.

Attribution. A member's own evidence is E_m = Σ_{j∈C} w_mj over its community. Its share of the
community's pooled behaviour is s_m = clip((E_m - E_0) / ``FULL_DIGITS``, 0, 1) with E_0 =
log10(pairs of accounts seen): the weight the best of all pairs reaches by chance (Bonferroni), so
a member whose evidence is at chance level gets nothing of the cluster's volume or shape, and one
at a family-wise 10^-3 gets all of it (``AccountMonitor._verdict``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from datasketch import MinHash, MinHashLSH
from scipy import special

from distillguard.detect.registry import Detector, register

_WORD = re.compile(r"\w+")
NUM_PERM = 64
MAX_WORDS = 96  # words of a prompt that are shingled
MAX_SHARERS = 50  # an item held by more accounts makes no more pairs
EDGE_MIN = (
    2.0  # -log10 p of a pair to be an edge; also the Potts resolution (mean weight in a community)
)
FULL_DIGITS = (
    3.0  # evidence beyond chance (log10) at which a cluster's behaviour is wholly a member's
)
# a changed account's whole connected component is re-partitioned up to this size; a larger one
# only around the change (Linker._recompute)
EXACT_COMPONENT = 500
KINDS = ("prompt", "template", "system", "network")
_NAMES = {
    "prompt": "near-duplicate prompts",
    "template": "shared templates",
    "system": "shared system prompt",
    "network": "same network",
}


# Near-duplicate prompts: datasketch's MinHash (scheme affine32, seed 1) and the band layout its
# MinHashLSH picks for Jaccard 0.6, computed here in one numpy pass per prompt. Building a MinHash
# object, hashing each shingle through struct.unpack and keeping every prompt's bands in the LSH
# index were ~60% of the online scorer's CPU without embeddings and ~1 GB per million prompts;
# the linker only needs band -> group. tests/detect/test_linking.py checks the signatures equal
# datasketch's.
_A, _B = (
    p.astype(np.uint32) for p in MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32").permutations
)
_BANDS, _ROWS = (lambda lsh: (lsh.b, lsh.r))(MinHashLSH(threshold=0.6, num_perm=NUM_PERM))
# odd 64-bit multipliers: a band's rows fold to one int key (collision chance ~2^-64 per pair)
_FOLD = (np.random.default_rng(0).integers(0, 2**63, _ROWS, dtype=np.uint64) * 2 + 1).astype(
    np.uint64
)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix for affine permutations); wraps mod 2^32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signature(shingles: list[bytes]) -> np.ndarray:
    """(NUM_PERM,) uint32: datasketch's MinHash(seed=1, scheme="affine32").update_batch(shingles)."""
    # sha1_hash32: the first 4 bytes of SHA-1, little-endian, as datasketch hashes a shingle
    hv = np.frombuffer(
        b"".join(hashlib.sha1(s).digest()[:4] for s in shingles), dtype="<u4"
    ).reshape(-1, 1)  # (S, 1)
    return (_fmix32(hv) * _A + _B).min(axis=0)  # (S, NUM_PERM) -> (NUM_PERM,)


def band_keys(signature: np.ndarray) -> list[int]:
    """The LSH bands of a signature, each folded to one int: two prompts are candidates when
    any band's key is equal (P = 1 - (1 - J^r)^b for Jaccard J)."""
    rows = signature[: _BANDS * _ROWS].reshape(_BANDS, _ROWS).astype(np.uint64)  # (b, r)
    return (rows * _FOLD).sum(axis=1).tolist()  # (b,), wraps mod 2^64


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt that are shingled: the first MAX_WORDS (near-duplicates share their
    openings, and hashing the shingles of a 4,000-character prompt was the linker's main cost)."""
    return _WORD.findall(prompt[: 8 * MAX_WORDS].lower())[:MAX_WORDS]


def prompt_band_keys(words: list[str]) -> list[int]:
    """The LSH band keys of a prompt's words (3-shingles): what the online linker and the
    partitioned job (detect/partitioned.py) both key near-duplicate groups by."""
    return band_keys(
        minhash_signature([f"{x} {y} {z}".encode() for x, y, z in zip(words, words[1:], words[2:])])
    )


@lru_cache(maxsize=65536)
def _network(ip: str | None) -> str | None:
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def poisson_evidence(k: int, lam: float) -> float:
    """-log10 P(Poisson(lam) ≥ k): the evidence of k shared items where lam were expected."""
    if k <= 0:
        return 0.0
    if lam <= 0:
        return math.inf
    # special.pdtrc is scipy.stats.poisson.sf without the distribution machinery (~50x faster: it
    # runs per pair update); below 1e-300 the evidence is capped, far beyond any threshold
    return -math.log10(max(float(special.pdtrc(k - 1, lam)), 1e-300))


def fisher_evidence(digits: list[float]) -> float:
    """-log10 of Fisher's combined p of independent tests, each given as -log10 p."""
    if not digits:
        return 0.0
    if math.isinf(sum(digits)):
        return math.inf
    x = 2.0 * math.log(10) * sum(digits)  # -2 Σ ln p
    return -math.log10(max(float(special.chdtrc(2 * len(digits), x)), 1e-300))


def kind_evidence(
    k: int, n_a: int, n_b: int, r_a: int, r_b: int, incidences: int, distinct: int
) -> float:
    """Evidence (-log10 p) that accounts a and b share k items of one kind by more than chance.

    n_*: the accounts' distinct items, r_*: the sums of their items' holder counts, incidences:
    Σ n over all accounts, distinct: items of the kind. The larger p of the two directions."""
    denom = max(incidences - n_a - n_b, 0) + distinct
    lam_ab = n_b * (r_a - k) / denom
    lam_ba = n_a * (r_b - k) / denom
    return min(poisson_evidence(k, lam_ab), poisson_evidence(k, lam_ba))


def communities(
    edges: dict[tuple[str, str], float], resolution: float = EDGE_MIN
) -> list[frozenset[str]]:
    """Leiden communities under the constant Potts model of a weighted graph ({(a, b): weight}):
    each community's mean weight over all its pairs is at least ``resolution`` (up to Leiden's
    local optimum), so a hub does not join accounts it links to that are not linked to each other."""
    import igraph as ig
    import leidenalg as la

    nodes = sorted({x for pair in edges for x in pair})
    index = {x: i for i, x in enumerate(nodes)}
    g = ig.Graph(n=len(nodes), edges=[(index[a], index[b]) for a, b in edges])
    g.es["weight"] = list(edges.values())
    part = la.find_partition(
        g, la.CPMVertexPartition, weights="weight", resolution_parameter=resolution, seed=0
    )
    return [frozenset(nodes[i] for i in members) for members in part]


def attributed_share(evidence: float, chance: float) -> float:
    """s = clip((E - E_0) / FULL_DIGITS, 0, 1): nothing at chance level, all at 10^-FULL_DIGITS beyond it."""
    return min(1.0, max(0.0, (evidence - chance) / FULL_DIGITS))


@dataclass(slots=True)
class Link:
    """What two accounts share, and how much it proves. (Slots: a population holds one per pair
    of accounts that share any item, millions at provider scale.)"""

    shared: Counter = field(default_factory=Counter)  # kind -> K
    examples: dict = field(default_factory=dict)  # kind -> a few shared items
    weight: float = 0.0  # -log10 p of the pair
    by_kind: dict = field(default_factory=dict)  # kind -> -log10 p
    total: int = 0  # Σ K over kinds


class Linker:
    """Incremental account linking over the whole request stream of a monitor (one implementation
    for the online monitor, the offline report and the calibration)."""

    def __init__(self, *, min_evidence: int = 3, common: frozenset[str] = frozenset()):
        self.min_evidence = min_evidence  # shared items before a pair is tested at all
        self.common = common
        # per LSH band: band key -> the smallest near-duplicate group among prompts with that band
        # (a prompt joins the smallest group of its candidates, so this is what a query of every
        # prompt inserted before would return: groups only decrease along a bucket's insertions)
        self._bands: list[dict[int, int]] = [{} for _ in range(_BANDS)]
        self._seq = 0
        self._label: dict[tuple[str, object], str] = {}  # item -> words for the reasons
        # kind -> account -> {item: holding number}: the numbers order a pair's shared items
        self._items: dict[str, dict[str, dict]] = {k: defaultdict(dict) for k in KINDS}
        self._held = 0  # holdings so far
        self._holders: dict[tuple[str, object], list[str]] = defaultdict(
            list
        )  # (kind, item) -> accounts
        self._r: dict[str, Counter] = {k: Counter() for k in KINDS}  # kind -> account -> R_a
        self._incidences: Counter[str] = Counter()  # kind -> D (Σ accounts' distinct items)
        self._distinct: Counter[str] = Counter()  # kind -> U (items held by anyone)
        self._template_uses: dict[str, Counter] = defaultdict(Counter)
        self._links: dict[tuple[str, str], Link] = {}  # pairs with ≥ min_evidence shared items
        # every pair that shares an item, by pair number (_pair_number): the Link once it has
        # min_evidence shared items, before that only how many it shares (an int, not the items:
        # millions of pairs at provider scale; _promote finds the items again)
        self._pairs: dict[int, int | Link] = {}
        self._ids: dict[str, int] = {}  # account -> number
        self._adj: dict[str, dict[str, float]] = defaultdict(dict)  # edges (w ≥ EDGE_MIN)
        self._community: dict[str, frozenset[str]] = {}
        self._dirty: set[str] = set()  # accounts whose edges changed
        self._accounts: set[str] = set()

    # ---- evidence ----
    def _hold(self, a: str, kind: str, item, label: str) -> None:
        """Account a holds an item (once): update popularity and the pairs that now share it."""
        items = self._items[kind][a]
        if item in items:
            return
        self._held += 1
        items[item] = self._held
        key = (kind, item)
        holders = self._holders[key]
        self._incidences[kind] += 1
        if not holders:
            self._distinct[kind] += 1
            self._label[key] = label
        if (
            len(holders) > MAX_SHARERS
        ):  # popular: d capped at MAX_SHARERS + 1 in R (no pairs from it)
            self._r[kind][a] += len(holders)
            return
        holders.append(a)
        d = len(holders)
        r = self._r[kind]
        r[a] += d
        for b in holders[:-1]:
            r[b] += 1
        pairs, ids, min_evidence = self._pairs, self._ids, self.min_evidence
        ia = ids.get(a)
        if ia is None:
            ia = ids[a] = len(ids)
        for b in holders[:-1]:  # up to MAX_SHARERS pair updates: the linker's main cost at scale
            ib = ids[b]
            number = (ia << 32) | ib if ia < ib else (ib << 32) | ia
            link = pairs.get(number, 0)
            if link.__class__ is int:  # most pairs never reach min_evidence shared items
                if link + 1 < min_evidence:
                    pairs[number] = link + 1
                    continue
                link = pairs[number] = self._promote(a, b, link)
            pair = (a, b) if a < b else (b, a)
            link.shared[kind] += 1
            link.total += 1
            shown = link.examples.setdefault(kind, [])
            if len(shown) < 3:
                shown.append(key)
            if link.total >= min_evidence:
                self._weigh(pair, link)

    def _promote(self, a: str, b: str, count: int) -> Link:
        """The Link of a pair that shared ``count`` items before the current holding: those
        items in the order the pair came to share them (the later of its two holdings), from
        the accounts' items. An item counts only where both were among its first holders."""
        shared = []
        for kind in KINDS:
            mine, theirs = self._items[kind].get(a), self._items[kind].get(b)
            if not mine or not theirs:
                continue
            if len(theirs) < len(mine):
                mine, theirs = theirs, mine
            for item, n in mine.items():
                m = theirs.get(item)
                if m is not None and max(n, m) < self._held:
                    holders = self._holders[(kind, item)]
                    if a in holders and b in holders:
                        shared.append((max(n, m), kind, (kind, item)))
        assert len(shared) == count, (a, b, len(shared), count)
        link = Link()
        for _, kind, key in sorted(shared):
            link.shared[kind] += 1
            link.total += 1
            shown = link.examples.setdefault(kind, [])
            if len(shown) < 3:
                shown.append(key)
        self._links[(a, b) if a < b else (b, a)] = link
        return link

    def _kind_weight(self, a: str, b: str, kind: str, k: int) -> float:
        items = self._items[kind]
        return kind_evidence(
            k,
            len(items[a]),
            len(items[b]),
            self._r[kind][a],
            self._r[kind][b],
            self._incidences[kind],
            self._distinct[kind],
        )

    def _by_kind(self, a: str, b: str, link: Link) -> dict[str, float]:
        held = [k for k in KINDS if self._items[k].get(a) and self._items[k].get(b)]
        return {k: self._kind_weight(a, b, k, link.shared[k]) for k in held}

    def shared_counts(self) -> dict[tuple[str, str], dict[str, int]]:
        """Shared items per kind of every pair with at least ``min_evidence`` of them."""
        return {pair: dict(link.shared) for pair, link in self._links.items()}

    def weight_now(self, a: str, b: str) -> float:
        """The pair's weight on the popularity counts as they are now: what a batch job over the
        same requests computes (the monitor weighed it when it last gained an item)."""
        link = self._links[(a, b) if a < b else (b, a)]
        return fisher_evidence(list(self._by_kind(a, b, link).values()))

    def _weigh(self, pair: tuple[str, str], link: Link) -> None:
        a, b = pair
        link.by_kind = self._by_kind(a, b, link)
        link.weight = fisher_evidence(list(link.by_kind.values()))
        was = b in self._adj[a]
        if link.weight >= EDGE_MIN:
            self._adj[a][b] = self._adj[b][a] = link.weight
        elif was:
            del self._adj[a][b], self._adj[b][a]
        else:
            return
        self._dirty.update(pair)

    def observe(self, f) -> None:
        a = f.account
        self._accounts.add(a)
        words = prompt_words(f.prompt)
        if (
            len(words) >= 8 and f.template not in self.common
        ):  # formulaic prompts people share: no evidence
            keys = prompt_band_keys(words)
            self._seq += 1
            found = [g for t, k in zip(self._bands, keys) if (g := t.get(k)) is not None]
            group = min(found) if found else self._seq
            for t, k in zip(self._bands, keys):
                t[k] = group  # group <= every group found in these buckets
            self._hold(a, "prompt", ("g", group), " ".join(words[:8]))
        if not f.has_text and f.prompt_hash:
            # a ledger that kept only hashes: exact duplicates are still evidence (near ones are not)
            self._hold(a, "prompt", ("h", f.prompt_hash), f"prompt sha256 {f.prompt_hash[:8]}")
        if f.template is not None and f.template not in self.common:
            uses = self._template_uses[a]
            uses[f.template] += 1
            if uses[f.template] == 3:
                self._hold(a, "template", f.template, f"template {f.template[:8]}")
        if f.system_hash is not None and f.system_hash not in self.common:
            self._hold(a, "system", f.system_hash, f"system prompt {f.system_hash[:8]}")
        net = _network(f.ip)
        if net is not None:
            self._hold(a, "network", net, net)

    # ---- communities ----
    def community(self, a: str) -> frozenset[str] | None:
        """The accounts scored as one actor with ``a`` (itself included); None when alone."""
        if a in self._dirty:
            self._recompute(a)
        c = self._community.get(a)
        return c if c is not None and len(c) > 1 else None

    def _recompute(self, a: str) -> None:
        """Re-partition what ``a``'s changed edges can affect: its connected component, exactly,
        up to ``EXACT_COMPONENT`` accounts; beyond that only the communities of ``a`` and its
        neighbours (the others keep theirs). A population's chance edges (p ≤ 10^-EDGE_MIN among
        millions of weighed pairs) chain most accounts into one component: Leiden over all of it
        at every change made offline scoring quadratic (1M requests / 50k accounts). CPM's
        quality is a sum over communities, so optimising a region with the rest fixed is the
        same objective restricted to the moves that touch the change."""
        seen, todo = {a}, [a]
        while todo and len(seen) <= EXACT_COMPONENT:
            for b in self._adj[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        if todo or len(seen) > EXACT_COMPONENT:
            self._dirty.discard(a)
            region: set[str] = set()
            for x in (a, *self._adj[a]):
                region |= self._community.get(x) or {x}
            edges = {
                (x, y): w for x in region for y, w in self._adj[x].items() if x < y and y in region
            }
            for x in region:
                self._community.pop(x, None)
            for c in communities(edges) if edges else ():
                for x in c:
                    self._community[x] = c
            return
        nodes = sorted(seen)
        self._dirty -= seen
        if len(nodes) == 1:
            self._community.pop(a, None)
            return
        for c in communities({(x, y): w for x in nodes for y, w in self._adj[x].items() if x < y}):
            for x in c:
                self._community[x] = c

    def cluster_size(self, a: str) -> int:
        c = self.community(a)
        return len(c) if c else 1

    def cluster_id(self, a: str) -> str | None:
        """The account's community, named after its first member; None when alone."""
        c = self.community(a)
        return f"cluster:{min(c)}" if c else None

    def evidence(self, a: str) -> float:
        """E_a: the account's own link evidence inside its community (Σ -log10 p of its links)."""
        c = self.community(a)
        return sum(w for b, w in self._adj[a].items() if b in c) if c else 0.0

    def chance_level(self) -> float:
        """E_0 = log10(pairs of accounts seen): the weight the best pair reaches by chance."""
        n = len(self._accounts)
        return math.log10(max(n * (n - 1) / 2, 1.0))

    def share(self, a: str) -> float:
        """s_a ∈ [0, 1]: how much of its community's pooled behaviour is attributed to ``a``."""
        e = self.evidence(a)
        return attributed_share(e, self.chance_level()) if e else 0.0

    def links(self, a: str) -> list[tuple[str, Link]]:
        """``a``'s links inside its community, strongest first."""
        c = self.community(a) or frozenset()
        out = [(b, self._links[(a, b) if a < b else (b, a)]) for b in self._adj[a] if b in c]
        return sorted(out, key=lambda bl: -bl[1].weight)

    def describe(self, link: Link) -> str:
        parts = []
        for kind, w in sorted(link.by_kind.items(), key=lambda kw: -kw[1]):
            k = link.shared[kind]
            if not k:
                continue
            shown = "; ".join(self._label[key][:40] for key in link.examples[kind][:2])
            parts.append(f"{_NAMES[kind]} ×{k} (10^-{w:.1f}: {shown})")
        return ", ".join(parts)


@register
class LinkingDetector(Detector):
    name = "linking"

    def observe(self, f, embedding) -> None:
        pass  # the scorer's Linker sees every record; this detector reads it

    def _linker(self) -> Linker | None:
        return self.context.linker

    def bind(self, account: str) -> None:
        self._account = account

    def score(self) -> float:
        linker = self._linker()
        return linker.evidence(self._account) if linker is not None else 0.0

    def reasons(self) -> list[str]:
        linker = self._linker()
        if linker is None:
            return []
        links = linker.links(self._account)
        if not links:
            return []
        shown = "; ".join(
            f"{b} w={link.weight:.1f} [{linker.describe(link)}]" for b, link in links[:3]
        )
        return [
            f"own link evidence {linker.evidence(self._account):.1f} (chance level "
            f"{linker.chance_level():.1f}, share of cluster behaviour {linker.share(self._account):.0%}) "
            f"over {len(links)} link(s): {shown}"
        ]


__all__ = [
    "Link",
    "Linker",
    "LinkingDetector",
    "attributed_share",
    "communities",
    "fisher_evidence",
    "kind_evidence",
    "minhash_signature",
    "poisson_evidence",
    "prompt_band_keys",
    "prompt_words",
]
