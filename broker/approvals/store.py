"""Where pending actions are kept, and how a wait learns that one was decided.

``ApprovalStore`` is the contract every implementation passes (the same
tests run against each). Every change of state is one conditional step, so
two approvers, or an approver and the expiry sweep, cannot both win, and an
approval is spent at most once. Each changing method takes ``record``: it
runs after the change is made and before any waiter is told; if it raises,
the change is undone and the error goes on. That is how "no record, no
effect" holds for approvals as it does for calls.

``wait`` ends when the action is decided, wherever that happened: in this
process for SQLite, on any replica for a shared store.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import anyio

from broker.approvals.model import Binding, PendingAction, Status, action_from_fields
from broker.errors import ConfigError, NotFound, NotPending, StoreFailed

Record = Callable[[PendingAction], None]


class ApprovalStore(Protocol):
    def add(self, action: PendingAction, record: Record) -> None:
        """Keep a new pending action."""

    def get(self, action_id: str) -> PendingAction:
        """The action with this id, or NotFound."""

    def listed(self, status: Status, *, limit: int = 200) -> list[PendingAction]:
        """Actions in ``status``, oldest first."""

    def count(self, status: Status) -> int:
        """How many actions are in ``status``, without reading them."""

    def decide(
        self,
        action_id: str,
        status: Status,
        *,
        approver: str,
        reason: str,
        now: float,
        record: Record,
    ) -> PendingAction:
        """Approve or reject a pending, unexpired action, or raise NotPending."""

    def consume(
        self, binding: Binding, now: float, record: Record
    ) -> PendingAction | None:
        """Spend the oldest unexpired approval for ``binding``, if there is one."""

    def expire(self, now: float) -> list[PendingAction]:
        """Mark pending and unused approved actions past their expiry as expired."""

    async def wait(self, action_id: str, within: float) -> PendingAction:
        """The action once no longer pending, or as it is ``within`` seconds on."""

    def close(self) -> None:
        """Release the store."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_actions (
    id          TEXT PRIMARY KEY,
    decision_id TEXT NOT NULL,
    subject     TEXT NOT NULL,
    issuer      TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    tool        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    server      TEXT NOT NULL,
    arguments   TEXT NOT NULL,
    policies    TEXT NOT NULL,
    created     REAL NOT NULL,
    expires     REAL NOT NULL,
    status      TEXT NOT NULL,
    approver    TEXT,
    reason      TEXT NOT NULL,
    decided     REAL
);
CREATE INDEX IF NOT EXISTS pending_actions_binding
    ON pending_actions (subject, tool, digest, status);
CREATE INDEX IF NOT EXISTS pending_actions_status ON pending_actions (status);
"""

_INSERT = """
INSERT INTO pending_actions (
    id, decision_id, subject, issuer, client_id, tool, digest, server,
    arguments, policies, created, expires, status, approver, reason, decided
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_DECIDE = """
UPDATE pending_actions SET status = ?, approver = ?, reason = ?, decided = ?
WHERE id = ? AND status = 'pending' AND expires > ?
RETURNING *
"""

_UNDECIDE = """
UPDATE pending_actions SET status = 'pending', approver = NULL, reason = '',
    decided = NULL
WHERE id = ? AND status = ?
"""

_CONSUME = """
UPDATE pending_actions SET status = 'used'
WHERE id = (
    SELECT id FROM pending_actions
    WHERE subject = ? AND issuer = ? AND client_id = ? AND tool = ?
        AND digest = ? AND status = 'approved' AND expires > ?
    ORDER BY created LIMIT 1
)
RETURNING *
"""

_EXPIRE = """
UPDATE pending_actions SET status = 'expired'
WHERE status IN ('pending', 'approved') AND expires <= ?
RETURNING *
"""

_BUSY_TIMEOUT_SECONDS = 1.0


class SqliteApprovalStore:
    """Pending actions in a table of the broker's SQLite state file.

    For one broker process: a wait is woken in process, so every change must
    be made from the event loop that waits (the API and the page are).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = _open(self.path)
        self._waiters: dict[str, set[anyio.Event]] = {}

    def add(self, action: PendingAction, record: Record) -> None:
        with self._mapped(), self._lock:
            self._db.execute(_INSERT, _row(action))
            try:
                record(action)
            except BaseException:
                self._db.execute(
                    "DELETE FROM pending_actions WHERE id = ?", (action.id,)
                )
                raise

    def get(self, action_id: str) -> PendingAction:
        with self._mapped(), self._lock:
            row = self._db.execute(
                "SELECT * FROM pending_actions WHERE id = ?", (action_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no pending action {action_id!r}")
        return _action(row)

    def count(self, status: Status) -> int:
        query = "SELECT COUNT(*) FROM pending_actions WHERE status = ?"
        with self._mapped(), self._lock:
            (found,) = self._db.execute(query, (status.value,)).fetchone()
        return int(found)

    def listed(self, status: Status, *, limit: int = 200) -> list[PendingAction]:
        query = (
            "SELECT * FROM pending_actions WHERE status = ? ORDER BY created LIMIT ?"
        )
        with self._mapped(), self._lock:
            rows = self._db.execute(query, (status.value, limit)).fetchall()
        return [_action(row) for row in rows]

    def decide(
        self,
        action_id: str,
        status: Status,
        *,
        approver: str,
        reason: str,
        now: float,
        record: Record,
    ) -> PendingAction:
        if status not in (Status.APPROVED, Status.REJECTED):
            raise ValueError(f"an approver cannot set {status.value}")
        params = (status.value, approver, reason, now, action_id, now)
        with self._mapped(), self._lock:
            row = self._db.execute(_DECIDE, params).fetchone()
            if row is None:
                raise NotPending(f"action {action_id} is not pending")
            action = _action(row)
            try:
                record(action)
            except BaseException:
                self._db.execute(_UNDECIDE, (action_id, status.value))
                raise
        self._notify(action_id)
        return action

    def consume(
        self, binding: Binding, now: float, record: Record
    ) -> PendingAction | None:
        params = (
            binding.subject,
            binding.issuer,
            binding.client_id,
            binding.tool,
            binding.digest,
            now,
        )
        with self._mapped(), self._lock:
            row = self._db.execute(_CONSUME, params).fetchone()
            if row is None:
                return None
            action = _action(row)
            try:
                record(action)
            except BaseException:
                self._db.execute(
                    "UPDATE pending_actions SET status = 'approved' "
                    "WHERE id = ? AND status = 'used'",
                    (action.id,),
                )
                raise
        self._notify(action.id)
        return action

    def expire(self, now: float) -> list[PendingAction]:
        with self._mapped(), self._lock:
            rows = self._db.execute(_EXPIRE, (now,)).fetchall()
        expired = [_action(row) for row in rows]
        for action in expired:
            self._notify(action.id)
        return expired

    async def wait(self, action_id: str, within: float) -> PendingAction:
        # Listen before looking, so a decision between the two is not missed.
        changed = anyio.Event()
        self._waiters.setdefault(action_id, set()).add(changed)
        try:
            action = self.get(action_id)
            if action.status is Status.PENDING:
                with anyio.move_on_after(within):
                    await changed.wait()
                action = self.get(action_id)
            return action
        finally:
            waiting = self._waiters.get(action_id, set())
            waiting.discard(changed)
            if not waiting:
                self._waiters.pop(action_id, None)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _notify(self, action_id: str) -> None:
        for changed in self._waiters.get(action_id, ()):
            changed.set()

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreFailed(f"approvals store {self.path}: {exc}") from exc


def _open(path: Path) -> sqlite3.Connection:
    if not path.parent.is_dir():
        raise ConfigError(f"approvals store {path}: directory {path.parent} not found")
    try:
        db = sqlite3.connect(
            path,
            timeout=_BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # autocommit: each statement is one change
            check_same_thread=False,
        )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise ConfigError(f"approvals store {path} cannot be used: {exc}") from exc
    db.row_factory = sqlite3.Row
    return db


def _row(action: PendingAction) -> tuple[object, ...]:
    binding = action.binding
    return (
        action.id,
        action.decision_id,
        binding.subject,
        binding.issuer,
        binding.client_id,
        binding.tool,
        binding.digest,
        action.server,
        json.dumps(action.arguments, ensure_ascii=False),
        json.dumps(list(action.policies)),
        action.created,
        action.expires,
        action.status.value,
        action.approver,
        action.reason,
        action.decided,
    )


def _action(row: sqlite3.Row) -> PendingAction:
    return action_from_fields(dict(row))
