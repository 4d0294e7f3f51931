"""The audit record: one entry per decision, written before the answer leaves.

An entry says who asked (subject, issuer, client), for what (server, tool,
redacted arguments, data classes), what Cedar said (reasons, errors), and how
it ended (outcome, category, detail). Arguments arrive already redacted by
``broker.classify``; nothing here sees a raw value.

If an entry cannot be written, ``record`` raises RecordFailed and the call
does not go ahead: a broker that cannot record must not act.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker.errors import ConfigError, RecordFailed


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision, as it is kept.

    ``method`` is the MCP method, or "http" for a denial at the HTTP edge.
    ``category`` is "allowed", or the category of the denial. ``tool`` holds
    the tool name, resource URI or prompt name the method touched.
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
    duration_ms  REAL
);
CREATE INDEX IF NOT EXISTS audit_entries_time ON audit_entries (time);
CREATE INDEX IF NOT EXISTS audit_entries_outcome_time
    ON audit_entries (outcome, time);
"""

_INSERT = """
INSERT INTO audit_entries (
    decision_id, time, method, outcome, category, subject, issuer, client_id,
    server, tool, reasons, errors, arguments, data_classes, detail, duration_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Absent bounds become infinities, so two fixed statements serve every
# filter; each reads its index in order, with no sort.
_COLUMNS = """
SELECT decision_id, time, method, outcome, category, subject, issuer,
    client_id, server, tool, reasons, errors, arguments, data_classes,
    detail, duration_ms
FROM audit_entries
"""
_SELECT = _COLUMNS + "WHERE time >= ? AND time < ? ORDER BY time, seq LIMIT ?"
_SELECT_OUTCOME = (
    _COLUMNS + "WHERE outcome = ? AND time >= ? AND time < ? ORDER BY time, seq LIMIT ?"
)

# A write waits this long for a lock held by another process (a report, a
# verify) before it fails; the event loop is blocked while it waits.
_BUSY_TIMEOUT_SECONDS = 1.0


class SqliteStore:
    """Audit entries in one SQLite file, for a single broker process.

    The broker calls ``record`` from its event loop thread; a write is one
    small insert, committed before ``record`` returns. WAL with
    ``synchronous=NORMAL`` keeps every committed entry through a crash of the
    broker; a power cut may lose the last few.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = _open(self.path)

    def record(self, entry: AuditEntry) -> None:
        row = _row(entry)
        failure = f"audit entry {entry.decision_id} not written"
        with _mapped(failure, entry.decision_id), self._lock:
            self._db.execute(_INSERT, row)

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
            isolation_level=None,  # autocommit: an insert is durable on return
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise ConfigError(f"audit store {path} cannot be opened: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        db.close()
        raise ConfigError(f"audit store {path} cannot be used: {exc}") from exc
    db.row_factory = sqlite3.Row
    return db


@contextlib.contextmanager
def _mapped(what: str, decision_id: str | None = None) -> Iterator[None]:
    """Turn every SQLite error into RecordFailed, the reason kept for the log."""
    try:
        yield
    except sqlite3.Error as exc:
        raise RecordFailed(f"{what}: {exc}", decision_id=decision_id) from exc


def _row(entry: AuditEntry) -> tuple[object, ...]:
    try:
        arguments = json.dumps(entry.arguments, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordFailed(
            f"audit entry {entry.decision_id} not written: arguments are not JSON",
            decision_id=entry.decision_id,
        ) from exc
    return (
        entry.decision_id,
        entry.time,
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
    )


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
    )
