"""The audit record: one entry per decision, written before the answer leaves.

An entry says who asked (subject, issuer, client), for what (server, tool,
redacted arguments, data classes), what Cedar said (reasons, errors), and how
it ended (outcome, category, detail). Arguments arrive already redacted by
``broker.classify``; nothing here sees a raw value.

If an entry cannot be written, ``record`` raises RecordFailed and the call
does not go ahead: a broker that cannot record must not act.

Entries are hash-chained in the order they are written (``broker.chain``):
``verify`` finds an entry that was edited, removed or moved, and ``prune``
leaves a checkpoint in place of what it removes, so the rest still verifies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker import chain
from broker.chain import Checkpoint, Head, Link, Verification
from broker.errors import ConfigError, RecordFailed

_log = logging.getLogger("broker.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision, as it is kept.

    ``method`` is the MCP method, or "http" for a denial at the HTTP edge.
    ``category`` is "allowed", or the category of the denial. ``tool`` holds
    the tool name, resource URI or prompt name the method touched.
    ``groups`` and ``scopes`` are the caller's, as policy saw them. ``shadow``
    marks a decision taken in shadow mode: recorded, not enforced.
    """

    decision_id: str
    time: float
    method: str
    outcome: str
    category: str
    subject: str | None = None
    issuer: str | None = None
    client_id: str | None = None
    server: str | None = None
    tool: str | None = None
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    arguments: object = None
    data_classes: tuple[str, ...] = ()
    detail: str = ""
    duration_ms: float | None = None
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    shadow: bool = False


class Store(Protocol):
    """Where audit entries go. Every implementation passes the same tests."""

    def record(self, entry: AuditEntry) -> None:
        """Keep ``entry`` durably before returning, or raise RecordFailed."""

    def entries(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        outcome: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Entries with ``since <= time < until``, oldest first."""

    def count(self) -> int:
        """How many entries are kept."""

    def verify(self) -> Verification:
        """Walk the whole chain; the result says where it first breaks, if it does."""

    def prune(self, before: float, *, now: float) -> Checkpoint | None:
        """Remove the oldest entries up to the first one at or after ``before``.

        A checkpoint of the removed prefix is kept so that the rest verifies;
        None when nothing was old enough.
        """

    def close(self) -> None:
        """Release the store; later calls fail."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_entries (
    seq          INTEGER PRIMARY KEY,
    decision_id  TEXT NOT NULL,
    time         REAL NOT NULL,
    method       TEXT NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('allow', 'deny')),
    category     TEXT NOT NULL,
    subject      TEXT,
    issuer       TEXT,
    client_id    TEXT,
    server       TEXT,
    tool         TEXT,
    reasons      TEXT NOT NULL,
    errors       TEXT NOT NULL,
    arguments    TEXT NOT NULL,
    data_classes TEXT NOT NULL,
    detail       TEXT NOT NULL,
    duration_ms  REAL,
    groups       TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    shadow       INTEGER NOT NULL CHECK (shadow IN (0, 1)),
    prev_hash    TEXT NOT NULL,
    entry_hash   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_entries_time ON audit_entries (time);
CREATE INDEX IF NOT EXISTS audit_entries_outcome_time
    ON audit_entries (outcome, time);
CREATE TABLE IF NOT EXISTS audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    through_seq INTEGER PRIMARY KEY,
    hash        TEXT NOT NULL,
    pruned      INTEGER NOT NULL,
    before      REAL NOT NULL,
    time        REAL NOT NULL
);
"""

_INSERT = """
INSERT INTO audit_entries (
    decision_id, time, method, outcome, category, subject, issuer, client_id,
    server, tool, reasons, errors, arguments, data_classes, detail, duration_ms,
    groups, scopes, shadow, seq, prev_hash, entry_hash
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Absent bounds become infinities, so two fixed statements serve every
# filter; each reads its index in order, with no sort.
_COLUMNS = """
SELECT decision_id, time, method, outcome, category, subject, issuer,
    client_id, server, tool, reasons, errors, arguments, data_classes,
    detail, duration_ms, groups, scopes, shadow, seq, prev_hash, entry_hash
FROM audit_entries
"""
_SELECT = _COLUMNS + "WHERE time >= ? AND time < ? ORDER BY time, seq LIMIT ?"
_SELECT_OUTCOME = (
    _COLUMNS + "WHERE outcome = ? AND time >= ? AND time < ? ORDER BY time, seq LIMIT ?"
)
_SELECT_CHAIN = _COLUMNS + "WHERE seq > ? ORDER BY seq"

_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
_SET_HEAD = "INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
_LAST_CHECKPOINT = """
SELECT through_seq, hash, pruned, before, time FROM audit_checkpoints
ORDER BY through_seq DESC LIMIT 1
"""
_FIRST_KEPT = "SELECT min(seq) FROM audit_entries WHERE time >= ?"
_LAST_SEQ = "SELECT max(seq) FROM audit_entries"
_LAST_ENTRY = "SELECT seq, entry_hash FROM audit_entries ORDER BY seq DESC LIMIT 1"

# A write waits this long for a lock held by another process (a report, a
# verify) before it fails; the event loop is blocked while it waits.
_BUSY_TIMEOUT_SECONDS = 1.0


class SqliteStore:
    """Audit entries in one SQLite file, shared safely by several processes.

    The broker calls ``record`` from its event loop thread; a write is one
    small insert, committed before ``record`` returns. WAL with
    ``synchronous=NORMAL`` keeps every committed entry through a crash of the
    broker; a power cut may lose the last few.

    The chain's head is read inside the write transaction (BEGIN IMMEDIATE),
    so two brokers or a broker and a prune on the same file never fork it.
    Keeping the head in memory instead would save nothing: another writer
    may have moved it, so it has to be read under the write lock anyway,
    and that read is an index lookup. The entry's canonical form is built
    before the lock is taken; only the hash that joins it to the head is
    computed inside.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = _open(self.path)

    def record(self, entry: AuditEntry) -> None:
        failure = f"audit entry {entry.decision_id} not written"
        row, body = _row(entry, failure)
        with _mapped(failure, entry.decision_id), self._lock, _writing(self._db):
            head = _tail(self._db)
            link = Head(head.seq + 1, chain.link_hash(body, head.hash))
            self._db.execute(_INSERT, (*row, link.seq, head.hash, link.hash))
            self._db.execute(_SET_HEAD, (link.seq, link.hash))

    def entries(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        outcome: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        low = float("-inf") if since is None else since
        high = float("inf") if until is None else until
        params: tuple[object, ...]
        if outcome is None:
            query, params = _SELECT, (low, high, limit)
        else:
            query, params = _SELECT_OUTCOME, (outcome, low, high, limit)
        with _mapped("audit entries not read"), self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [_entry(row) for row in rows]

    def count(self) -> int:
        with _mapped("audit entries not counted"), self._lock:
            row = self._db.execute("SELECT count(*) FROM audit_entries").fetchone()
        return int(row[0])

    def verify(self) -> Verification:
        # One read transaction: the head and the entries are one snapshot.
        with _mapped("audit chain not read"), self._lock, _reading(self._db):
            checkpoint = _last_checkpoint(self._db)
            start = checkpoint.head if checkpoint else chain.START
            rows = self._db.execute(_SELECT_CHAIN, (start.seq,))
            links = (_link(row) for row in rows)
            return chain.verify(links, start=start, head=_head(self._db))

    def prune(self, before: float, *, now: float) -> Checkpoint | None:
        with _mapped("audit entries not pruned"), self._lock, _writing(self._db):
            through = _prunable(self._db, before)
            if through is None:
                return None
            hashed = self._db.execute(
                "SELECT entry_hash FROM audit_entries WHERE seq = ?", (through,)
            ).fetchone()
            if hashed is None:
                return None  # the chain is already broken there; keep the evidence
            removed = self._db.execute(
                "DELETE FROM audit_entries WHERE seq <= ?", (through,)
            ).rowcount
            checkpoint = Checkpoint(through, hashed[0], removed, before, now)
            self._db.execute(
                "INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?)",
                (through, checkpoint.hash, removed, before, now),
            )
        return checkpoint

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _open(path: Path) -> sqlite3.Connection:
    if not path.parent.is_dir():
        raise ConfigError(f"audit store {path}: directory {path.parent} not found")
    try:
        db = sqlite3.connect(
            path,
            timeout=_BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # transactions are begun and ended explicitly
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise ConfigError(f"audit store {path} cannot be opened: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        _check_chained(db, path)
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO audit_head (id, seq, hash) VALUES (1, 0, ?)",
            (chain.GENESIS,),
        )
    except sqlite3.Error as exc:
        db.close()
        raise ConfigError(f"audit store {path} cannot be used: {exc}") from exc
    db.row_factory = sqlite3.Row
    return db


def _check_chained(db: sqlite3.Connection, path: Path) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(audit_entries)")}
    if columns and "entry_hash" not in columns:
        db.close()
        raise ConfigError(
            f"audit store {path} was written before entries were hash-chained; "
            "move it aside (nothing in it is changed) and start with a new one"
        )


@contextlib.contextmanager
def _writing(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds SQLite's write lock from its first line."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def _reading(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.rollback()


@contextlib.contextmanager
def _mapped(what: str, decision_id: str | None = None) -> Iterator[None]:
    """Turn every SQLite error into RecordFailed, the reason kept for the log."""
    try:
        yield
    except sqlite3.Error as exc:
        raise RecordFailed(f"{what}: {exc}", decision_id=decision_id) from exc


def _head(db: sqlite3.Connection) -> Head:
    row = db.execute(_HEAD).fetchone()
    if row is None:
        # The head row is made when the store is opened; without it, say the
        # chain starts afresh and let verify report the entries as not fitting.
        return chain.START
    return Head(int(row[0]), str(row[1]))


def _tail(db: sqlite3.Connection) -> Head:
    """What the next entry links to: the head, or the last entry if it lies past it.

    Both differ only when the head row was altered; recording then goes on
    (verify reports the break) instead of failing on a taken sequence number.
    """
    head = _head(db)
    last = db.execute(_LAST_ENTRY).fetchone()
    if last is not None and int(last[0]) > head.seq:
        return Head(int(last[0]), str(last[1]))
    return head


def _last_checkpoint(db: sqlite3.Connection) -> Checkpoint | None:
    row = db.execute(_LAST_CHECKPOINT).fetchone()
    if row is None:
        return None
    return Checkpoint(int(row[0]), str(row[1]), int(row[2]), row[3], row[4])


def _prunable(db: sqlite3.Connection, before: float) -> int | None:
    """The end of the longest prefix of entries that are all older than ``before``."""
    (first_kept,) = db.execute(_FIRST_KEPT, (before,)).fetchone()
    if first_kept is None:
        (last,) = db.execute(_LAST_SEQ).fetchone()
        return None if last is None else int(last)
    (older,) = db.execute(
        "SELECT max(seq) FROM audit_entries WHERE seq < ?", (first_kept,)
    ).fetchone()
    return None if older is None else int(older)


def _row(entry: AuditEntry, failure: str) -> tuple[tuple[object, ...], bytes]:
    """The columns of ``entry`` and its canonical form for the chain."""
    try:
        arguments = json.dumps(entry.arguments, ensure_ascii=False, allow_nan=False)
        body = chain.canonical(entry)
    except (TypeError, ValueError) as exc:
        raise RecordFailed(
            f"{failure}: arguments are not JSON", decision_id=entry.decision_id
        ) from exc
    columns = (
        entry.decision_id,
        float(entry.time),
        entry.method,
        entry.outcome,
        entry.category,
        entry.subject,
        entry.issuer,
        entry.client_id,
        entry.server,
        entry.tool,
        json.dumps(list(entry.reasons)),
        json.dumps(list(entry.errors)),
        arguments,
        json.dumps(list(entry.data_classes)),
        entry.detail,
        entry.duration_ms,
        json.dumps(list(entry.groups)),
        json.dumps(list(entry.scopes)),
        int(bool(entry.shadow)),
    )
    return columns, body


def _entry(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(
        decision_id=row["decision_id"],
        time=row["time"],
        method=row["method"],
        outcome=row["outcome"],
        category=row["category"],
        subject=row["subject"],
        issuer=row["issuer"],
        client_id=row["client_id"],
        server=row["server"],
        tool=row["tool"],
        reasons=tuple(json.loads(row["reasons"])),
        errors=tuple(json.loads(row["errors"])),
        arguments=json.loads(row["arguments"]),
        data_classes=tuple(json.loads(row["data_classes"])),
        detail=row["detail"],
        duration_ms=row["duration_ms"],
        groups=tuple(json.loads(row["groups"])),
        scopes=tuple(json.loads(row["scopes"])),
        shadow=bool(row["shadow"]),
    )


def _link(row: sqlite3.Row) -> Link:
    try:
        entry: AuditEntry | None = _entry(row)
    except (TypeError, ValueError):
        entry = None
    return Link(int(row["seq"]), entry, str(row["prev_hash"]), str(row["entry_hash"]))


def record_or_log(store: Store, entry: AuditEntry) -> None:
    """Record an entry whose outcome stands either way, such as a denial.

    A denial must not turn into anything else because the record is down;
    when the entry cannot be written, the log keeps it instead.
    """
    try:
        store.record(entry)
    except RecordFailed as exc:
        _log.error(
            "audit record failed for %s %s (%s): %s",
            entry.outcome,
            entry.method,
            entry.decision_id,
            exc.detail,
        )
