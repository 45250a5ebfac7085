"""One online detector for every gateway replica (``distillguard monitor``), surviving restarts.

Behind a load balancer each replica's in-process monitor (``serve --detect CAL``) sees 1/N of an
account's requests and of the evidence linking accounts, and forgets everything when it
restarts. Here one process follows the shared ledger instead: every replica's finished requests,
in the order they were committed, go to the same :class:`~distillguard.guard.online.OnlineDetection`
the in-process path uses (``guard/monitor.py``'s :func:`observe_rows`), and its verdicts are
appended to the ledger's ``verdicts`` table, where every replica reads an account's level
(``guard/verdicts.py``; trusted for ``verdict_cache_ttl_s``, 2 s by default). Replicas run with
``serve --detect external`` and keep no monitor of their own. The request path never waits for
this process: when it is down, no new verdicts are reached, and nothing else changes.

The feed (:class:`LedgerFeed`) reads the ``requests`` table by its primary key. The monitor's
state and the feed's cursor are saved together (:class:`Checkpoint`), atomically, every
``every_s`` seconds or ``every_n`` requests and at SIGTERM; a restart loads them and goes on from
the cursor, so the requests seen since the last checkpoint are replayed onto the state that had
not seen them: nothing is lost and nothing counted twice.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.exc import InterfaceError, OperationalError

from distillguard.errors import ConfigError
from distillguard.guard.lease import Lease, LeaseLost
from distillguard.guard.monitor import escalations, score
from distillguard.guard.schema import LedgerRow
from distillguard.guard.verdicts import Verdicts

log = logging.getLogger(__name__)

# The ledger columns the monitor reads (``to_traffic``), plus the keys the feed and the verdicts need.
_COLUMNS = (
    LedgerRow.id,
    LedgerRow.request_id,
    LedgerRow.ts,
    LedgerRow.account_id,
    LedgerRow.client_ip,
    LedgerRow.request_body,
    LedgerRow.response_text,
    LedgerRow.prompt_tokens,
    LedgerRow.completion_tokens,
    LedgerRow.status,
)


def feedable(row) -> bool:
    """The rows the in-process path feeds its monitor (``guard/recorder.py``): answered requests
    (200) and requests whose client hung up after getting tokens (499), so that a harvester that
    always disconnects a token early is not invisible. Refusals (4xx, 503 stubs) carry no answer."""
    if row.account_id is None:
        return False
    return row.status == 200 or (row.status == 499 and bool(row.completion_tokens))


@dataclass
class LedgerFeed:
    """Every ledger row once, by primary key, whatever order the replicas commit them in.

    Why a lag window over the ids and not ``id > last``: PostgreSQL hands out identity values at
    INSERT, not at COMMIT, so two replicas' group commits can become visible out of order (ids
    21-25 committed while 10-20 are still in flight); a plain ``id > last`` tail would jump past
    10-20 and never read them. So every id below ``high`` that has not been read is kept as an open
    *gap*, and each poll reads the gaps again as well as what lies above ``high``. A gap closes
    when its rows appear, or after ``lag_s`` seconds: an id can also stay missing for good (a
    transaction that rolled back, a batch the ledger writer retried under new ids), and a row
    that commits minutes after it was numbered means the ledger was wedged long past the point
    where the gateway answers 503 (``ledger_wedged_s``, 30 s). Each row is read exactly once
    because a row id is fetched only as new (above ``high``) or as a gap member, never both.
    SQLite has a single writer, so its ids commit in order and gaps are only ids rolled back.

    The cursor (``high`` and the gaps, with the wall-clock time each was seen) is plain data,
    saved with the monitor's state by :class:`Checkpoint`.
    """

    engine: Engine
    lag_s: float = 120.0
    batch: int = 2000
    high: int = 0  # every id <= high has been read, is an open gap, or was given up on
    last_request_id: str | None = None  # the row at ``high``: identifies the ledger on restart
    gaps: list[list] = field(default_factory=list)  # [[lo, hi, first_seen_wall_s], ...]
    given_up: int = 0  # ids abandoned after lag_s (logged; normally rolled-back numbers)

    def cursor(self) -> dict:
        return {
            "high": self.high,
            "last_request_id": self.last_request_id,
            "gaps": [list(g) for g in self.gaps],
            "given_up": self.given_up,
        }

    def restore(self, cursor: dict) -> None:
        self.high = int(cursor["high"])
        self.last_request_id = cursor.get("last_request_id")
        self.gaps = [list(g) for g in cursor.get("gaps", [])]
        self.given_up = int(cursor.get("given_up", 0))

    def check_ledger(self) -> None:
        """Refuse a cursor that belongs to another ledger (or to one whose ids started again):
        the row the cursor stopped at must be the one it remembers, when it still exists."""
        if self.high == 0 or self.last_request_id is None:
            return
        with self.engine.connect() as conn:
            found = conn.execute(
                select(LedgerRow.request_id).where(LedgerRow.id == self.high)
            ).scalar()
        if found is not None and found != self.last_request_id:
            raise ConfigError(
                f"the checkpoint's cursor stopped at ledger row {self.high} = "
                f"{self.last_request_id}, but this ledger's row {self.high} is {found}: the "
                "checkpoint belongs to another ledger. Use the --state directory of this ledger, "
                "or start over with --rebuild (replays this ledger from its first row)"
            )

    def poll(self, now: float | None = None) -> list:
        """The rows not read before (feedable or not, oldest id first), at most ``batch`` new ones."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            late = []
            if self.gaps:
                late = conn.execute(
                    select(*_COLUMNS).where(
                        or_(*(LedgerRow.id.between(lo, hi) for lo, hi, _ in self.gaps))
                    )
                ).all()
            new = conn.execute(
                select(*_COLUMNS)
                .where(LedgerRow.id > self.high)
                .order_by(LedgerRow.id)
                .limit(self.batch)
            ).all()
            if not new and self.high > 0 and not late:
                # SQLite without AUTOINCREMENT numbers a row max(id) + 1, so after a prune that
                # removed every row the ids start again below ``high`` and would never be read.
                top = conn.execute(select(func.max(LedgerRow.id))).scalar()
                if top is not None and top < self.high:
                    log.warning(
                        "ledger ids went back from %d to %d (every row was pruned): "
                        "reading from the first row again",
                        self.high,
                        top,
                    )
                    self.high, self.gaps = 0, []
        if late:
            self._fill({r.id for r in late})
        prev = self.high
        for r in new:
            if r.id > prev + 1:
                self.gaps.append([prev + 1, r.id - 1, now])
            prev = r.id
        if new:
            self.high, self.last_request_id = prev, new[-1].request_id
        self._expire(now)
        return sorted([*late, *new], key=lambda r: r.id)

    def _fill(self, found: set[int]) -> None:
        """Split the gaps around the ids that turned up (by the found ids, not the gap's width:
        a sequence that jumped ahead can leave a gap of millions)."""
        found_sorted = sorted(found)
        gaps = []
        for lo, hi, seen in self.gaps:
            start = lo
            for i in found_sorted[bisect.bisect_left(found_sorted, lo) :]:
                if i > hi:
                    break
                if i > start:
                    gaps.append([start, i - 1, seen])
                start = i + 1
            if start <= hi:
                gaps.append([start, hi, seen])
        self.gaps = gaps

    def _expire(self, now: float) -> None:
        keep = []
        for gap in self.gaps:
            if now - gap[2] > self.lag_s:
                self.given_up += gap[1] - gap[0] + 1
                log.info(
                    "ledger ids %d-%d never committed within %.0f s: assumed rolled back",
                    gap[0],
                    gap[1],
                    self.lag_s,
                )
            else:
                keep.append(gap)
        self.gaps = keep

    @property
    def lagging(self) -> int:
        """Ids below ``high`` still awaited."""
        return sum(hi - lo + 1 for lo, hi, _ in self.gaps)


# ---- checkpoint ---------------------------------------------------------------------------

MAGIC = b"distillguard-detector-checkpoint\n"
FORMAT = 1
CHECKPOINT_NAME = "detector.ckpt"


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def code_fingerprint(detection) -> str:
    """A digest of the source of every class whose instances the checkpoint pickles: the detect
    package, the online levels, this module, and each detector's own module (plugins included).
    Pickle restores objects by class name and attribute dict, so a checkpoint from other code
    could load into objects with missing or renamed fields and score wrong without an error;
    refusing it instead is the safe side (the ledger still holds the evidence: --rebuild)."""
    files = {Path(__file__), Path(importlib.util.find_spec("distillguard.guard.online").origin)}
    detect_dir = Path(importlib.util.find_spec("distillguard.detect").origin).parent
    files |= set(detect_dir.glob("*.py"))
    import inspect

    for cls in getattr(detection.monitor, "classes", []):
        src = inspect.getsourcefile(cls)
        if src:
            files.add(Path(src))
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: (p.name, str(p))):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _shared(detection) -> dict:
    """Objects the checkpoint refers to by name instead of storing: the calibration (its benign
    tails and reference sample, loaded from the calibration file at start) and the embedder
    (a model)."""
    monitor = getattr(detection, "monitor", None)  # a plugin monitor may wrap nothing
    cal = getattr(monitor, "calibration", None)
    shared = {"calibration": cal, "embedder": getattr(monitor, "embedder", None)}
    if cal is not None:
        shared["reference"] = cal.reference
        shared["config"] = cal.config
        shared.update({f"tail:{k}": v for k, v in cal.tails.items()})
    return {k: v for k, v in shared.items() if v is not None}


class _Pickler(pickle.Pickler):
    def __init__(self, f, shared: dict):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self._names = {id(v): k for k, v in shared.items()}

    def persistent_id(self, obj):
        return self._names.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, shared: dict):
        super().__init__(f)
        self._shared = shared

    def persistent_load(self, pid):
        if pid not in self._shared:
            raise pickle.UnpicklingError(f"checkpoint refers to {pid!r}, which this run lacks")
        return self._shared[pid]


@dataclass
class Checkpoint:
    """``STATE_DIR/detector.ckpt``: a JSON header line (what wrote it, the cursor, counts), then
    the pickled :class:`OnlineDetection` (per-account detectors and histories, the linker's pair
    evidence and communities, the pooled cluster streams, each account's flag count).

    Written to a temporary file, fsynced and renamed over the old one, so a crash mid-write
    leaves the previous checkpoint whole. Pickle, because the state is dozens of detector
    classes (plugins among them) whose fields would each need a schema; it is loaded only if
    its header names the same format, code fingerprint and calibration file digest, and the
    directory is created 0700 (a pickle from someone else would run their code)."""

    state_dir: Path
    calibration_digest: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.state_dir / CHECKPOINT_NAME

    def save(self, detection, cursor: dict, requests: int) -> dict:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "code": self.fingerprint,
            "calibration": self.calibration_digest,
            "written_at": time.time(),
            "requests": requests,
            "accounts": len(getattr(detection.monitor, "accounts", {})),
            # flagged requests per account (a flag past extracting_after makes it 'extracting')
            "flagged": dict(getattr(detection, "_flags", {})),
            "cursor": cursor,
        }
        buf = io.BytesIO()
        _Pickler(buf, _shared(detection)).dump(detection)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + json.dumps(header).encode() + b"\n")
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        return header

    def load(self, fresh) -> tuple[object, dict] | None:
        """(the saved detection, its header) or None when there is no checkpoint; ``fresh`` is a
        new detection built from the same calibration, whose shared objects the saved one uses."""
        if not self.path.exists():
            return None
        header = read_header(self.path)
        problems = []
        if header.get("format") != FORMAT:
            problems.append(f"format {header.get('format')} (this code reads {FORMAT})")
        if header.get("calibration") != self.calibration_digest:
            problems.append("another calibration file")
        if header.get("code") != self.fingerprint:
            problems.append("another version of the detection code")
        if problems:
            raise ConfigError(
                f"{self.path} was written with {' and '.join(problems)}: its state would not "
                "match this detector's. Start over with --rebuild (replays the ledger from its "
                "first row, so no evidence still in the ledger is lost) or use another --state"
            )
        with open(self.path, "rb") as f:
            f.readline()
            f.readline()
            detection = _Unpickler(f, _shared(fresh)).load()
        adopt = getattr(detection, "adopt_rules", None)  # a plugin monitor may have no ladder
        if adopt is not None:
            adopt(fresh)
        return detection, header


def read_header(path: str | Path) -> dict:
    """The checkpoint's header (cursor, counts, what wrote it), without loading the state."""
    with open(path, "rb") as f:
        if f.readline() != MAGIC:
            raise ConfigError(f"{path} is not a distillguard detector checkpoint")
        return json.loads(f.readline())


# ---- the follower -------------------------------------------------------------------------


def _in_memory(row: dict, fresh: dict[str, dict] | None) -> dict:
    mine = fresh.pop(row["request_id"], None) if fresh else None
    if mine is not None:
        row["request_body"], row["response_text"] = mine["request_body"], mine["response_text"]
    return row


class Stopped(Exception):
    """Asked to stop while verdicts were still unrecorded: the state must not be checkpointed."""


_DB_DOWN = (OperationalError, InterfaceError)


class DetectorService:
    """Poll the feed, score what it returns, record escalations, checkpoint; until ``stop``."""

    def __init__(
        self,
        detection,
        verdicts: Verdicts,
        feed: LedgerFeed,
        checkpoint: Checkpoint | None,
        *,
        poll_s: float = 0.5,
        every_s: float = 30.0,
        every_n: int = 10_000,
        max_batch: int = 256,
        lease: Lease | None = None,
    ):
        self.detection = detection
        self.lease = lease  # when given, checked before every write (verdicts, checkpoint)
        # None: the state lives in memory only (``serve --detect`` on a ledger without a state dir)
        self.verdicts = verdicts
        self.feed = feed
        self.checkpoint = checkpoint
        self.poll_s = poll_s
        self.every_s = every_s
        self.every_n = every_n
        self.max_batch = max_batch
        self.requests = 0  # rows fed to the monitor, over the checkpoint's life
        self.errors = 0  # batches the monitor failed on (skipped), and non-finite scores
        self._since_save = 0
        self._saved_at = time.monotonic()

    def restore(self) -> dict | None:
        """Load the checkpoint if there is one; returns its header."""
        if self.checkpoint is None:
            return None
        loaded = self.checkpoint.load(self.detection)
        if loaded is None:
            return None
        self.detection, header = loaded
        self.feed.restore(header["cursor"])
        self.feed.check_ledger()
        self.requests = int(header.get("requests", 0))
        return header

    def save(self) -> dict | None:
        if self.lease is not None:
            self.lease.check()
        header = None
        if self.checkpoint is not None:
            header = self.checkpoint.save(self.detection, self.feed.cursor(), self.requests)
        self._since_save, self._saved_at = 0, time.monotonic()
        return header

    def step(self, stop: threading.Event, fresh: dict[str, dict] | None = None) -> int:
        """One poll: every row read is scored and its escalations recorded before the next poll.
        Returns the number of rows read (feedable or not).

        ``fresh``: rows this process still holds in memory, by request id (the in-process
        monitor's own requests, guard/shared_monitor.py). A ledger row found there is scored
        with the prompt and answer held in memory, not the ledger's copy, which
        ``--ledger-content`` or ``--redact`` may have hashed or cut; it is popped from ``fresh``."""
        rows = self._retry(self.feed.poll, stop)
        todo = [_in_memory(r._asdict(), fresh) for r in rows if feedable(r)]
        for i in range(0, len(todo), self.max_batch):
            chunk = todo[i : i + self.max_batch]
            try:
                results = score(self.detection, chunk)
            except Exception:  # noqa: BLE001 - a detector bug skips its batch, as in-process
                self.errors += 1
                log.exception(
                    "monitor failed on %d requests from %s", len(chunk), chunk[0]["request_id"]
                )
                continue
            # the monitor has now seen these rows: their verdicts must be recorded before any
            # checkpoint (else a restart would neither replay them nor have recorded them)
            # (escalations only: a retry after a partial write records nothing twice)
            if self.lease is not None:
                self.lease.check()  # another monitor took over: it records these itself
            holder = self.lease.holder if self.lease is not None else None
            refused = self._retry(
                escalations, stop, self.detection, self.verdicts, chunk, results, holder
            )
            self.errors += len(refused)  # non-finite scores: detector errors, as in-process
            self.requests += len(chunk)
            self._since_save += len(chunk)
        return len(rows)

    def _retry(self, fn, stop: threading.Event, *args):
        """``fn(*args)``, waited out while the database is unreachable (the detector has nothing to do
        without it); a stop request while verdicts are pending raises :class:`Stopped`."""
        delay = 0.5
        while True:
            try:
                return fn(*args)
            except _DB_DOWN as exc:
                log.warning(
                    "ledger unreachable (%s); retrying in %.1f s", type(exc).__name__, delay
                )
                if stop.wait(delay):
                    raise Stopped from exc
                delay = min(delay * 2, 30.0)

    def due(self) -> bool:
        return self._since_save >= self.every_n or (
            self._since_save > 0 and time.monotonic() - self._saved_at >= self.every_s
        )

    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        """Follow the ledger until ``stop`` is set (SIGTERM), or with ``once`` until it has read
        every row committed so far; saves the checkpoint on the way out."""
        try:
            while not stop.is_set():
                read = self.step(stop)
                if self.due():
                    self.save()
                if read == 0:
                    if once and not self.feed.gaps:
                        break
                    stop.wait(self.poll_s)
        except Stopped:
            log.warning("stopped while the ledger was unreachable; the last checkpoint stands")
            return
        self.save()


__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "DetectorService",
    "Lease",
    "LeaseLost",
    "LedgerFeed",
    "code_fingerprint",
    "feedable",
    "file_digest",
    "read_header",
]
