"""The contract of an approvals store, run against every implementation.

Each test runs once on SQLite and once on Redis, under a key prefix of its
own in the Redis on 127.0.0.1:6379 (which must answer: the test fails, it
is not skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from broker.approvals.model import Binding, PendingAction, Status, digest_of
from broker.approvals.store import ApprovalStore, SqliteApprovalStore
from broker.errors import NotFound, NotPending, RecordFailed
from tests.redis_support import redis_approvals

NOW = 1_900_000_000.0
BINDING = Binding("alice", "https://idp", "agent-7", "demo.delete_note", "sha256:1")


def pending(
    action_id: str = "a1", *, created: float = NOW, **changes: object
) -> PendingAction:
    action = PendingAction(
        id=action_id,
        decision_id=f"d-{action_id}",
        binding=BINDING,
        server="demo",
        arguments={"title": "t"},
        policies=("destructive-needs-approval",),
        created=created,
        expires=created + 60,
    )
    return dataclasses.replace(action, **changes)  # type: ignore[arg-type]


class Recorded:
    """The ``record`` callback: keeps what it was given, or fails when told."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.actions: list[PendingAction] = []

    def __call__(self, action: PendingAction) -> None:
        if self.fail:
            raise RecordFailed("audit sink down")
        self.actions.append(action)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApprovalStore]:
    if request.param == "sqlite":
        opened: ApprovalStore = SqliteApprovalStore(tmp_path / "state.db")
        yield opened
        opened.close()
        return
    with redis_approvals() as stores:
        yield stores()


def approve(store: ApprovalStore, action_id: str = "a1", now: float = NOW) -> None:
    store.decide(
        action_id,
        Status.APPROVED,
        approver="carol",
        reason="ok",
        now=now,
        record=Recorded(),
    )


def test_an_action_comes_back_as_it_was_kept(store: ApprovalStore) -> None:
    """Every field survives the round trip, and add records the action once."""
    recorded = Recorded()
    store.add(pending(), recorded)
    assert store.get("a1") == pending()
    assert recorded.actions == [pending()]


def test_an_unknown_action_is_not_found(store: ApprovalStore) -> None:
    """get of an id never added raises NotFound."""
    with pytest.raises(NotFound):
        store.get("nope")


def test_a_failed_record_keeps_no_action(store: ApprovalStore) -> None:
    """If the creation cannot be recorded, the action is not kept."""
    with pytest.raises(RecordFailed):
        store.add(pending(), Recorded(fail=True))
    with pytest.raises(NotFound):
        store.get("a1")


def test_listed_shows_pending_actions_oldest_first(store: ApprovalStore) -> None:
    """Only pending actions are listed, in the order they were created."""
    store.add(pending("late", created=NOW + 5), Recorded())
    store.add(pending("early"), Recorded())
    store.add(pending("done"), Recorded())
    approve(store, "done")
    assert [a.id for a in store.listed(Status.PENDING)] == ["early", "late"]


def test_actions_are_counted_by_status_without_listing(store: ApprovalStore) -> None:
    for n in range(3):
        store.add(pending(f"a{n}", created=NOW + n), Recorded())
    approve(store, "a1")
    assert (store.count(Status.PENDING), store.count(Status.APPROVED)) == (2, 1)
    assert store.count(Status.REJECTED) == 0


def test_an_action_is_decided_once(store: ApprovalStore) -> None:
    """The first decision wins; a second one raises NotPending."""
    store.add(pending(), Recorded())
    approve(store)
    with pytest.raises(NotPending):
        store.decide(
            "a1",
            Status.REJECTED,
            approver="dave",
            reason="no",
            now=NOW,
            record=Recorded(),
        )
    kept = store.get("a1")
    assert (kept.status, kept.approver, kept.reason) == (Status.APPROVED, "carol", "ok")


def test_an_expired_action_cannot_be_decided(store: ApprovalStore) -> None:
    """A decision at or after the expiry raises NotPending."""
    store.add(pending(), Recorded())
    with pytest.raises(NotPending):
        approve(store, now=NOW + 60)


def test_a_failed_record_undoes_the_decision(store: ApprovalStore) -> None:
    """If the approval cannot be recorded, the action is still pending."""
    store.add(pending(), Recorded())
    with pytest.raises(RecordFailed):
        store.decide(
            "a1",
            Status.APPROVED,
            approver="carol",
            reason="",
            now=NOW,
            record=Recorded(fail=True),
        )
    assert store.get("a1").status is Status.PENDING


def test_an_approval_is_spent_once(store: ApprovalStore) -> None:
    """consume returns the approved action the first time and None after."""
    store.add(pending(), Recorded())
    approve(store)
    first = store.consume(BINDING, NOW + 1, Recorded())
    again = store.consume(BINDING, NOW + 1, Recorded())
    assert first is not None
    assert first.status is Status.USED
    assert again is None


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "mallory"},
        {"issuer": "https://other-idp"},
        {"client_id": "agent-8"},
        {"tool": "demo.write_note"},
        {"digest": digest_of({"title": "other"})},
    ],
)
def test_an_approval_binds_every_part(
    store: ApprovalStore, change: dict[str, str]
) -> None:
    """A binding differing in any one part does not spend the approval."""
    store.add(pending(), Recorded())
    approve(store)
    other = dataclasses.replace(BINDING, **change)
    assert store.consume(other, NOW + 1, Recorded()) is None
    assert store.consume(BINDING, NOW + 1, Recorded()) is not None


def test_an_expired_approval_is_not_spent(store: ApprovalStore) -> None:
    """An approval past the action's expiry spends nothing."""
    store.add(pending(), Recorded())
    approve(store)
    assert store.consume(BINDING, NOW + 60, Recorded()) is None


def test_a_rejection_is_not_spent(store: ApprovalStore) -> None:
    """A rejected action gives no approval."""
    store.add(pending(), Recorded())
    store.decide(
        "a1", Status.REJECTED, approver="carol", reason="no", now=NOW, record=Recorded()
    )
    assert store.consume(BINDING, NOW + 1, Recorded()) is None


def test_a_failed_record_keeps_the_approval(store: ApprovalStore) -> None:
    """If the use cannot be recorded, the approval stays unspent."""
    store.add(pending(), Recorded())
    approve(store)
    with pytest.raises(RecordFailed):
        store.consume(BINDING, NOW + 1, Recorded(fail=True))
    assert store.consume(BINDING, NOW + 1, Recorded()) is not None


def test_expire_marks_each_overdue_action_once(store: ApprovalStore) -> None:
    """Pending and unspent approved actions past expiry expire, once; others stay."""
    store.add(pending("waiting"), Recorded())
    store.add(pending("approved"), Recorded())
    store.add(pending("spent", created=NOW - 1), Recorded())
    store.add(pending("fresh", created=NOW + 100), Recorded())
    approve(store, "approved")
    approve(store, "spent")
    spent = store.consume(BINDING, NOW + 1, Recorded())
    expired = store.expire(NOW + 60)
    assert spent is not None
    assert spent.id == "spent"  # the oldest approval goes first
    assert sorted(a.id for a in expired) == ["approved", "waiting"]
    assert store.expire(NOW + 60) == []
    assert store.get("fresh").status is Status.PENDING


async def test_a_wait_ends_when_the_action_is_decided(store: ApprovalStore) -> None:
    """A waiter wakes as soon as another task decides, long before its timeout."""
    store.add(pending(), Recorded())
    seen: list[PendingAction] = []

    async def waiter() -> None:
        seen.append(await store.wait("a1", 30))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.sleep(0.05)
            approve(store)
    assert [a.status for a in seen] == [Status.APPROVED]


async def test_a_wait_runs_out_with_the_action_pending(store: ApprovalStore) -> None:
    """Without a decision the wait returns the still pending action."""
    store.add(pending(), Recorded())
    with anyio.fail_after(5):
        action = await store.wait("a1", 0.05)
    assert action.status is Status.PENDING


async def test_a_wait_on_a_decided_action_returns_at_once(store: ApprovalStore) -> None:
    """Waiting for an action already decided does not wait at all."""
    store.add(pending(), Recorded())
    approve(store)
    with anyio.fail_after(1):
        action = await store.wait("a1", 30)
    assert action.status is Status.APPROVED
