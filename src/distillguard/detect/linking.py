"""Cross-account linking: accounts that share prompts, templates, system prompts or networks.

Evidence between two accounts, one count each:
- a near-duplicate prompt (MinHash LSH on word 3-shingles, Jaccard ≥ 0.6; datasketch), unless its
  template is common among benign users or more than 50 accounts sent it,
- a template signature both used at least 3 times,
- a system prompt both sent,
- the same /24 network (IPv4) or /48 (IPv6), once per pair.
Templates and system prompts that several benign reference accounts share are not evidence.
Two accounts with ``link_min_evidence`` counts are linked; linked components (union-find)
are clusters, scored as one actor by pooling their streams (``monitor.py``). The
``linking`` detector scores an account by the size of its cluster.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import lru_cache

from datasketch import MinHash, MinHashLSH

from distillguard.detect.registry import Detector, register

_WORD = re.compile(r"\w+")
NUM_PERM = 64
MAX_WORDS = 96   # words of a prompt that are shingled
MAX_SHARERS = 50  # near-duplicates across more accounts than this are a popular prompt


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


class Linker:
    """Incremental account linking over the whole request stream of a monitor."""

    def __init__(self, *, min_evidence: int = 3, common: frozenset[str] = frozenset(),
                 on_merge: Callable[[str, str], None] | None = None):
        self.min_evidence = min_evidence
        self.common = common
        self.on_merge = on_merge
        self._lsh = MinHashLSH(threshold=0.6, num_perm=NUM_PERM)
        self._seq = 0
        self._evidence: Counter[tuple[str, str]] = Counter()
        self._why: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self._seen_pairs: set[tuple[str, str, str]] = set()
        self._item_users: dict[str, Counter[str]] = defaultdict(Counter)
        self._net_users: dict[str, set[str]] = defaultdict(set)
        self._prompt_users: dict[str, set[str]] = {}  # hashed prompt -> accounts (ledgers without text)
        self._parent: dict[str, str] = {}
        self._size: Counter[str] = Counter()
        self._perm = MinHash(num_perm=NUM_PERM, seed=1)  # shared permutations: building hashes is cheap

    # ---- union-find ----
    def find(self, a: str) -> str:
        p = self._parent.setdefault(a, a)
        if p != a:
            p = self._parent[a] = self.find(p)
        return p

    def cluster_size(self, a: str) -> int:
        return self._size.get(self.find(a), 1)

    def members(self, root: str) -> list[str]:
        return sorted(a for a in self._parent if self.find(a) == root)

    def cluster_id(self, a: str) -> str | None:
        """The account's cluster, named after its root account; None when alone."""
        root = self.find(a)
        return f"cluster:{root}" if self._size.get(root, 1) > 1 else None

    def why(self, a: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for (x, y), c in self._why.items():
            if a in (x, y):
                out.update(c)
        return out

    def _add(self, a: str, b: str, kind: str, item: str = "") -> None:
        if a == b:
            return
        pair = (a, b) if a < b else (b, a)
        if item:
            key = (pair[0], pair[1], kind + item)
            if key in self._seen_pairs:
                return
            self._seen_pairs.add(key)
        self._evidence[pair] += 1
        self._why[pair][kind] += 1
        if self._evidence[pair] >= self.min_evidence:
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                sa, sb = self._size.get(ra, 1), self._size.get(rb, 1)
                if sa < sb:
                    ra, rb = rb, ra
                self._parent[rb] = ra
                self._size[ra] = sa + sb
                self._size.pop(rb, None)
                if self.on_merge is not None:
                    self.on_merge(ra, rb)

    def observe(self, f) -> None:
        a = f.account
        self.find(a)
        # the first MAX_WORDS words: near-duplicates share their openings, and hashing the shingles of
        # a 4,000-character prompt was the linker's main cost
        words = _WORD.findall(f.prompt[:8 * MAX_WORDS].lower())[:MAX_WORDS]
        if len(words) >= 8 and f.template not in self.common:  # formulaic prompts people share: no evidence
            m = MinHash(num_perm=NUM_PERM, permutations=self._perm.permutations, scheme=self._perm.scheme)
            m.update_batch([" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)])
            others = {key.split("\x00", 1)[0] for key in self._lsh.query(m)} - {a}
            if len(others) <= MAX_SHARERS:  # a prompt half the world sends is not a campaign's signature
                for other in others:
                    self._add(a, other, "near-duplicate prompts")
            self._seq += 1
            self._lsh.insert(f"{a}\x00{self._seq}", m)
        if not f.has_text and f.prompt_hash:
            # a ledger that kept only hashes: exact duplicates are still evidence (near ones are not)
            sharers = self._prompt_users.setdefault(f.prompt_hash, set())
            if a not in sharers and len(sharers) <= MAX_SHARERS:
                for other in sharers:
                    self._add(a, other, "identical prompts (hashed)")
            if len(sharers) <= MAX_SHARERS:
                sharers.add(a)
        for item, kind, need in ((f.template, "shared template", 3), (f.system_hash, "shared system prompt", 1)):
            if item is None or item in self.common:
                continue
            users = self._item_users[item]
            users[a] += 1
            if users[a] == need:
                for other, c in users.items():
                    if other != a and c >= need:
                        self._add(a, other, kind, item)
        net = _network(f.ip)
        if net is not None:
            users = self._net_users[net]
            if a not in users:
                for other in users:
                    self._add(a, other, "same network " + net, net)
                users.add(a)


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
        return float(linker.cluster_size(self._account) - 1) if linker is not None else 0.0

    def reasons(self) -> list[str]:
        linker = self._linker()
        if linker is None or linker.cluster_size(self._account) < 2:
            return []
        why = ", ".join(f"{k} ×{v}" for k, v in linker.why(self._account).most_common(3))
        return [f"linked with {linker.cluster_size(self._account) - 1} other account(s): {why}"]


__all__ = ["Linker", "LinkingDetector"]
