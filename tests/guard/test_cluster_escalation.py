"""A linked campaign escalates as one actor (issue 23): a flag whose verdict carries a cluster
counts for the cluster too, so a hydra whose keys each send fewer than ``extracting_after``
flagged requests still reaches ``extracting`` (canaries), while benign users linked to a sweeper
by the public prompts they share are neither flagged nor escalated.

Replays arena traffic through the gateway's own ``OnlineDetection`` over a calibrated
``AccountMonitor`` (no HTTP, no embeddings: the detectors of tests/detect/test_linking.py), in
batches of the monitor worker's size, as bench/ladder_false_positives.py does."""

from __future__ import annotations

from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate
from distillguard.detect.monitor import AccountMonitor
from distillguard.guard.monitor import MAX_BATCH
from distillguard.guard.online import OnlineDetection
from distillguard.guard.policy import Level
from tests.detect.test_linking import NO_EMBEDDINGS, _benign, public_prompts, sweeper

EXTRACTING_AFTER = 100  # the default ladder's (serve --extracting-after)


def replay(records: list[dict], cal, **kwargs) -> tuple[dict, dict, dict]:
    """Each account's highest level, the reasons it got there, and its flagged requests."""
    online = OnlineDetection(AccountMonitor(cal), extracting_after=EXTRACTING_AFTER, **kwargs)
    level: dict[str, Level] = {}
    reasons: dict[str, tuple[str, ...]] = {}
    flags: Counter = Counter()
    for start in range(0, len(records), MAX_BATCH):
        batch = records[start : start + MAX_BATCH]
        for r, v in zip(batch, online.observe_batch(batch), strict=True):
            if v is None:
                continue
            flags[r["account"]] += v.level >= Level.SUSPECT
            if v.level > level.get(r["account"], Level.OK):
                level[r["account"]], reasons[r["account"]] = v.level, v.reasons
    return level, reasons, flags


@pytest.fixture(scope="module")
def population():
    cal_records, _ = _benign("calibration", 240, seed=21)
    cal = calibrate(cal_records, config=DetectConfig(target_fpr=0.001, detectors=NO_EMBEDDINGS))
    records, users = _benign("eval", 160, seed=22, campaigns=["hydra:20:60"])
    records = sorted(records + sweeper(min(r["ts"] for r in records)), key=lambda r: r["ts"])
    label = {r["account"]: r["label"] for r in records}
    return SimpleNamespace(
        cal=cal,
        cal_records=cal_records,
        records=records,
        users=users,
        label=label,
        hydra=sorted(a for a, lab in label.items() if lab == "hydra"),
        pooled=replay(records, cal),
        alone=replay(records, cal, pool_clusters=False),
    )


def test_a_hydra_whose_keys_each_stay_under_extracting_after_reaches_extracting(population):
    level, reasons, flags = population.pooled
    hydra = population.hydra
    assert len(hydra) == 20
    # the case is real: no key sends extracting_after flagged requests of its own...
    assert max(flags[a] for a in hydra) < EXTRACTING_AFTER, [flags[a] for a in hydra]
    # ...so counted alone (the code before issue 23) none is ever served canaries
    alone, _, _ = population.alone
    assert not [a for a in hydra if alone.get(a) == Level.EXTRACTING]
    # counted as one actor, its keys are
    extracting = [a for a in hydra if level.get(a) == Level.EXTRACTING]
    assert len(extracting) >= 8, {a: level.get(a) for a in hydra}  # 10 of 20 when written
    why = reasons[extracting[0]][0]
    n = int(why.split(" accounts: ")[1].split(" flagged requests together")[0])
    assert why.startswith("cluster:") and n > EXTRACTING_AFTER, why


def test_benign_users_sharing_a_sweepers_prompts_are_not_flagged_nor_escalated(population):
    level, reasons, _ = population.pooled
    # the case is real: most of the 50 send the sweeper 3+ of its prompts (enough to link them)
    public = set(public_prompts())
    shared = Counter(
        r["account"]
        for r in population.records
        if r["account"] in population.users and r["request"]["messages"][-1]["content"] in public
    )
    assert sum(shared[u] >= 3 for u in population.users) >= 25, shared
    escalated = {u: level[u] for u in population.users if u in level and level[u] >= Level.SUSPECT}
    assert escalated == {}, {u: reasons[u] for u in escalated}
    assert level["acct-sweeper"] == Level.EXTRACTING
    # no benign account anywhere reaches extracting by the campaigns' counts
    benign = [a for a, lab in population.label.items() if lab == "benign"]
    assert not [a for a in benign if level.get(a) == Level.EXTRACTING]


# ---- the counting itself, on scripted verdicts (tests the ladder, not detection) ----


class _Scripted:
    """A monitor replaying given (account, level, members) verdicts."""

    def __init__(self, script):
        self.script = iter(script)

    def observe_batch(self, records):
        out = []
        for _ in records:
            account, level, members = next(self.script)
            members = frozenset(members) if members else None
            out.append(
                SimpleNamespace(
                    account=account,
                    level=level,
                    score=1.0,
                    reasons=(),
                    cluster=f"cluster:{min(members)}" if members else None,
                    members=members,
                )
            )
        return out


def _levels(script, **kwargs):
    online = OnlineDetection(_Scripted(script), extracting_after=4, **kwargs)
    return [v and v.level for v in (online.observe({"account": s[0]}) for s in script)]


def test_a_communitys_count_is_its_members_linked_flags_across_merges_and_splits():
    ab, cd, abcd = ("a", "b"), ("c", "d"), ("a", "b", "c", "d")
    script = [
        ("a", "flag", ab),
        ("b", "flag", ab),  # {a, b}: 2
        ("c", "flag", cd),
        ("d", "flag", cd),  # {c, d}: 2
        ("a", "flag", abcd),  # merged under a new id: 2 + 2 + 1 = 5 > 4
        ("c", "flag", cd),  # split again: {c, d} has c's 2 + d's 1 = 3
        ("e", "flag", None),  # alone: its own count only
        ("c", "watch", cd),
        ("d", "ok", cd),  # a linked account that is not flagged stays where it is
        ("d", "flag", cd),  # {c, d}: 4, not more than 4
        ("d", "flag", cd),  # 5
    ]
    got = _levels(script)
    assert got == [
        Level.SUSPECT,
        Level.SUSPECT,
        Level.SUSPECT,
        Level.SUSPECT,
        Level.EXTRACTING,
        Level.SUSPECT,
        Level.SUSPECT,
        Level.WATCH,
        None,
        Level.SUSPECT,
        Level.EXTRACTING,
    ]
    # without pooling only an account's own flags count (the code before issue 23)
    assert Level.EXTRACTING not in _levels(script, pool_clusters=False)


def test_a_members_flags_from_before_its_links_were_proven_count_once_they_are():
    script = [("p", "flag", None)] * 3 + [
        ("q", "flag", ("p", "q")),  # p is not a proven member yet: 1
        ("p", "flag", ("p", "q")),  # now it is, with all 4 of its flags: 5 > 4
    ]
    assert _levels(script)[3:] == [Level.SUSPECT, Level.EXTRACTING]


def test_a_member_that_left_takes_its_flags_with_it():
    script = [("x", "flag", ("x", "y", "z"))] * 3 + [
        ("y", "flag", ("y", "z")),  # x left: 1, not 4
        ("z", "flag", ("y", "z")),
        ("y", "flag", ("y", "z")),
        ("z", "flag", ("y", "z")),  # 4
        ("y", "flag", ("y", "z")),  # 5 > 4
    ]
    assert _levels(script)[3:] == [Level.SUSPECT] * 4 + [Level.EXTRACTING]


def test_extracting_after_s_escalates_an_account_flagged_again_a_day_later():
    flags = [("s", "flag", None)] * 3
    for after, want in ((None, Level.SUSPECT), (86_400.0, Level.EXTRACTING)):
        online = OnlineDetection(_Scripted(flags), extracting_after=100, extracting_after_s=after)
        got = [online.observe({"account": "s", "ts": ts}) for ts in (0.0, 3600.0, 90_000.0)]
        assert [v.level for v in got] == [Level.SUSPECT, Level.SUSPECT, want]
    assert got[2].reasons[0] == "flagged again 25 h after its first flag"


def test_verdict_members_are_the_community_that_counted(population):
    """The monitor's verdicts carry the community (its accounts) whenever they carry its id."""
    monitor = AccountMonitor(population.cal)
    seen = defaultdict(int)
    for start in range(0, len(population.records), MAX_BATCH):
        for v in monitor.observe_batch(population.records[start : start + MAX_BATCH]):
            assert v.cluster is None or v.members is not None
            if v.members is not None:  # set on a flag even where the pooled score did not count
                assert v.cluster is not None or v.level == "flag"
                assert v.account in v.members
                assert v.cluster in (None, f"cluster:{min(v.members)}")
                seen[min(v.members)] += 1
    assert seen  # the hydra's verdicts do carry clusters


def test_a_lone_low_and_slow_account_is_extracting_with_the_time_rule_and_suspect_without(
    population,
):
    """A careful distiller on one key, linked to nobody (no other campaign draws on its prompts,
    no benign user sends them), never sends ``extracting_after`` flagged requests in two days:
    only the time rule (``serve --extracting-after-s``) serves it canaries."""
    records = generate_traffic(
        TrafficConfig(benign_accounts=160, seed=25, days=2, pool="eval", campaigns=["slowlow:1:90"])
    )
    # At 0.1% a calibration on 240 users floors the threshold above this account's scores
    # (bench/ladder_false_positives.py calibrates on 2,000); at 1% it is flagged on and off
    cal = calibrate(
        population.cal_records, config=DetectConfig(target_fpr=0.01, detectors=NO_EMBEDDINGS)
    )
    verdicts = []
    monitor = AccountMonitor(cal)
    for start in range(0, len(records), MAX_BATCH):
        verdicts.extend(monitor.observe_batch(records[start : start + MAX_BATCH]))
    (lone,) = {r["account"] for r in records if r["label"] == "slowlow"}
    # the case is real: flagged on its own evidence, never as a member of a community
    mine = [v for v in verdicts if v.account == lone]
    assert sum(v.level == "flag" for v in mine) >= 10
    assert all(v.members is None for v in mine), [v.members for v in mine if v.members]

    def highest(after_s):
        online = OnlineDetection(
            None, extracting_after=EXTRACTING_AFTER, extracting_after_s=after_s
        )
        level, why = {}, {}
        for start in range(0, len(records), MAX_BATCH):
            batch = records[start : start + MAX_BATCH]
            for r, v in zip(batch, online.levels(verdicts[start : start + MAX_BATCH], batch)):
                if v is not None and v.level > level.get(r["account"], Level.OK):
                    level[r["account"]], why[r["account"]] = v.level, v.reasons[0]
        return level, why

    level, _ = highest(None)
    assert level[lone] == Level.SUSPECT
    level, why = highest(6 * 3600.0)
    assert level[lone] == Level.EXTRACTING
    hours = float(why[lone].removeprefix("flagged again ").split(" h ")[0])
    assert why[lone].endswith("after its first flag") and hours >= 6, why[lone]
    # the rule's control: no benign account of the population is taken to extracting by it
    benign = {r["account"] for r in records if r["label"] == "benign"}
    assert not [a for a in benign if level.get(a) == Level.EXTRACTING]
