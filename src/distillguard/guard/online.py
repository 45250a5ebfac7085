"""Online detection in the gateway: :class:`distillguard.detect.AccountMonitor` verdicts become levels.

The detector speaks ``ok`` / ``watch`` / ``flag`` (calibrated to a false-positive rate per
benign account-day); the policy ladder speaks :class:`~distillguard.guard.policy.Level`. A flag
makes an account ``suspect`` (throttled, logprobs limited, stronger watermark by default); an
account still flagged ``extracting_after`` requests later, under those countermeasures, is
``extracting`` (the same, plus canaries: evidence for ``forensics canaries``). Online detection
goes no higher (``policy.MAX_AUTOMATIC``): ``blocked`` is an admin's decision. Without a
calibration there is no online detection.

A linked actor counts as one (issue 23). A campaign spread over many keys sends fewer than
``extracting_after`` flagged requests per key, so per-account counting never served it canaries,
the provider's evidence. A flag whose verdict carries a cluster (the monitor sets it only when the
community's pooled behaviour counted for this account by its own link evidence) also counts for
that community, and a flagged account is ``extracting`` when its own count or its community's
passes ``extracting_after``. Only a flagged account moves: a benign account linked to a campaign
but not itself flagged stays where it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distillguard.guard.policy import Level


@dataclass(frozen=True)
class LevelVerdict:
    level: Level
    score: float
    reasons: tuple[str, ...]


class OnlineDetection:
    """The gateway's monitor (``Guard(monitor=...)``): batches of traffic records in, levels out.

    ``pool_clusters=False`` counts each account's flags alone (the behaviour before issue 23,
    kept so the tests can show the difference). ``extracting_after_s`` (off by default) also makes
    an account ``extracting`` when it is flagged again that many seconds after its first flag
    (a low-and-slow account, not linked to anyone, may never send ``extracting_after`` requests)."""

    def __init__(
        self,
        monitor,
        *,
        extracting_after: int = 100,
        pool_clusters: bool = True,
        extracting_after_s: float | None = None,
    ):
        from distillguard.errors import ConfigError

        if extracting_after < 1:
            raise ConfigError(
                f"extracting_after={extracting_after} must be >= 1 (flagged requests before 'extracting')"
            )
        if extracting_after_s is not None and not extracting_after_s > 0:
            raise ConfigError(
                f"extracting_after_s={extracting_after_s} must be > 0 seconds, or None to "
                "count flagged requests only"
            )
        self.monitor = monitor
        self.extracting_after = extracting_after
        self.pool_clusters = pool_clusters
        self.extracting_after_s = extracting_after_s
        self._flags: dict[str, int] = {}
        self._first_flag_ts: dict[str, float] = {}
        # A community's count is the sum of the flagged requests of its current members that are
        # linked members: accounts one of whose flags carried the community (the monitor sets it
        # only when the account's OWN link evidence is beyond chance). All of such a member's
        # flags count, those before the links were proven too: they are the actor's requests.
        # Leiden re-runs change communities as evidence arrives (a key joins, two proxy ranges of
        # one campaign merge, a chance member leaves), and the id (its smallest member) changes
        # with them. Keyed by id, the count would restart at each change (a campaign that keeps
        # adding keys might never reach it); carrying over the max of old counts would keep the
        # flags of members that have left. Summing members' own counts survives every change
        # exactly: a merge adds both halves, a split keeps to each part what its accounts did. The
        # sum is recomputed only when a flag arrives with a community not seen before (O(members),
        # as the monitor's own rebuild of the pooled stream then), updated in O(1) otherwise.
        self._linked: set[str] = set()
        self._cluster_flags: dict[frozenset[str], int] = {}
        self._community: dict[str, frozenset[str]] = {}  # account -> its entry in _cluster_flags

    @classmethod
    def from_calibration(cls, path: str | Path, **kwargs) -> OnlineDetection:
        from distillguard.detect.calibrate import Calibration
        from distillguard.detect.monitor import AccountMonitor

        return cls(AccountMonitor(Calibration.load(path)), **kwargs)

    def _count_linked(self, account: str, members: frozenset[str] | None) -> int:
        """Count a flag of ``account`` (already in ``_flags``) for its community: ``members`` when
        the verdict carries one, else the last one it carried; that community's total (0: none)."""
        flags, totals = self._flags, self._cluster_flags
        if members is None:  # its community did not count this time: its last one still does
            last = self._community.get(account)
            if account in self._linked and last in totals:
                totals[last] += 1
            return 0
        newly = account not in self._linked
        self._linked.add(account)
        total = totals.get(members)
        if total is None:  # a new community: drop the ones its members left, sum their flags
            for m in members:
                old = self._community.get(m)
                if old is not None:
                    totals.pop(old, None)
                self._community[m] = members
            total = sum(flags.get(m, 0) for m in members if m in self._linked)
        else:
            total += flags[account] if newly else 1
        totals[members] = total
        return total

    def _level(self, verdict, ts: float | None = None) -> LevelVerdict | None:
        escalated: str | None = None
        if verdict.level == "flag":
            a = verdict.account
            n = self._flags[a] = self._flags.get(a, 0) + 1
            members = getattr(verdict, "members", None)
            pooled = self._count_linked(a, members) if self.pool_clusters else 0
            first = self._first_flag_ts.setdefault(a, ts) if ts is not None else None
            if n > self.extracting_after:
                escalated = f"still flagged {self.extracting_after} requests after the first flag"
            elif pooled > self.extracting_after:
                escalated = (
                    f"cluster:{min(members)} of {len(members)} accounts: {pooled} flagged requests "
                    f"together (more than {self.extracting_after}; {n} of them this account's)"
                )
            elif (
                self.extracting_after_s is not None
                and first is not None
                and ts - first >= self.extracting_after_s
            ):
                escalated = f"flagged again {_duration(ts - first)} after its first flag"
            level = Level.EXTRACTING if escalated else Level.SUSPECT
        elif verdict.level == "watch":
            level = Level.WATCH
        else:
            return None
        reasons = list(verdict.reasons)
        if getattr(verdict, "cluster", None):
            reasons.append(f"linked accounts scored as one actor: cluster {verdict.cluster}")
        if escalated:
            reasons.insert(0, escalated)
        return LevelVerdict(level=level, score=float(verdict.score), reasons=tuple(reasons))

    def observe_batch(self, records: Sequence[dict]) -> list[LevelVerdict | None]:
        records = list(records)
        return self.levels(self.monitor.observe_batch(records), records)

    def levels(self, verdicts: Sequence, records: Sequence[dict]) -> list[LevelVerdict | None]:
        """The levels of the monitor's ``verdicts`` on ``records`` (what ``observe_batch`` returns),
        so that one monitor's verdicts can be read by several ladders (bench/ladder_false_positives.py
        replays each escalation rule on the same detection)."""
        return [self._level(v, _ts(r)) for v, r in zip(verdicts, records, strict=True)]

    def adopt_rules(self, configured: OnlineDetection) -> None:
        """Take the escalation thresholds of ``configured`` (built from this run's options): a
        detection restored from a checkpoint keeps its counts and first-flag times, which are
        evidence, but a restart with another ``--extracting-after``/``--extracting-after-s``
        must apply the new thresholds to them, not the checkpoint's."""
        self.extracting_after = configured.extracting_after
        self.extracting_after_s = configured.extracting_after_s

    def describe(self) -> str:
        """The escalation rule in words, for the start-up line."""
        rule = f"'extracting' after {self.extracting_after} flagged requests"
        if self.pool_clusters:
            rule += " (its own, or its linked community's together)"
        if self.extracting_after_s is not None:
            rule += (
                f" or when flagged again {_duration(self.extracting_after_s)} after its first flag"
            )
        return rule

    def observe(self, record: dict) -> LevelVerdict | None:
        return self.observe_batch([record])[0]


def _duration(seconds: float) -> str:
    """``25 h``, ``12.5 h``, ``3 s``: hours from an hour up, to a tenth."""
    value, unit = (seconds / 3600, "h") if seconds >= 3600 else (seconds, "s")
    return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"


def _ts(record) -> float | None:
    ts = record.get("ts") if isinstance(record, dict) else None
    return float(ts) if isinstance(ts, int | float) else None


__all__ = ["LevelVerdict", "OnlineDetection"]
