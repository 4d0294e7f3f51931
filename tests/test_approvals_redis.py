"""Approvals in Redis: what replicas share, and how the store fails and recovers.

The contract every store passes is in test_approvals_store.py; these tests
are about more than one replica, and about Redis refusing, going mute,
dying and coming back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from broker.approvals.model import PendingAction, Status
from broker.approvals.redis_keys import binding_key
from broker.approvals.store import ApprovalStore
from broker.approvals.store_redis import RedisApprovalStore
from broker.errors import NotPending, RecordFailed, StoreFailed
from tests.redis_support import (
    TIMEOUT,
    mute_port,
    redis_approvals,
    redis_server,
)
from tests.stores import redis_client
from tests.test_approvals_store import BINDING, NOW, Recorded, approve, pending

Replicas = Callable[[], RedisApprovalStore]
T = TypeVar("T")
REPLICAS = 8
# Races run one after another: a race lost to timing in one is caught in another.
RACES = 20


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    """Opens one more store on the same keys each time it is called."""
    with redis_approvals() as open_store:
        yield open_store


def reject(store: ApprovalStore, action_id: str = "a1") -> None:
    store.decide(
        action_id,
        Status.REJECTED,
        approver="carol",
        reason="no",
        now=NOW,
        record=Recorded(),
    )


async def waited(
    store: ApprovalStore, decide: Callable[[], None], within: float = 30
) -> tuple[PendingAction, float]:
    """What ``store.wait`` returns when ``decide`` runs meanwhile, and how soon."""
    seen: list[PendingAction] = []

    async def waiter() -> None:
        seen.append(await store.wait("a1", within))

    started = time.monotonic()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.sleep(0.1)
            decide()
    return seen[0], time.monotonic() - started


# ---- what replicas share ----------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(
    ("decide", "status"),
    [(approve, Status.APPROVED), (reject, Status.REJECTED)],
)
async def test_a_wait_on_one_replica_ends_when_another_decides(
    replicas: Replicas, decide: Callable[[ApprovalStore], None], status: Status
) -> None:
    """A decision on replica B wakes a wait on replica A at once, not at its end."""
    here, there = replicas(), replicas()
    here.add(pending(), Recorded())
    action, elapsed = await waited(here, lambda: decide(there))
    assert action.status is status
    assert elapsed < 1.5


@pytest.mark.redis
async def test_an_expiry_on_another_replica_ends_a_wait(replicas: Replicas) -> None:
    """The expiry sweep of any replica wakes a wait with the action expired."""
    here, there = replicas(), replicas()
    here.add(pending(), Recorded())
    action, elapsed = await waited(here, lambda: there.expire(NOW + 60))
    assert action.status is Status.EXPIRED
    assert elapsed < 1.5


def at_once(
    stores: list[RedisApprovalStore], call: Callable[[ApprovalStore], T]
) -> list[T]:
    """``call`` on every store, each in a thread of its own, all let go together."""
    start = threading.Barrier(len(stores))

    def run(store: ApprovalStore) -> T:
        start.wait()
        return call(store)

    with ThreadPoolExecutor(len(stores)) as pool:
        return list(pool.map(run, stores))


@pytest.mark.redis
def test_racing_replicas_spend_an_approval_once(replicas: Replicas) -> None:
    """Eight replicas spend one approval at one instant, twenty times: one wins each."""
    stores = [replicas() for _ in range(REPLICAS)]

    def spend(store: ApprovalStore) -> PendingAction | None:
        return store.consume(BINDING, NOW + 1, Recorded())

    winners = []
    for race in range(RACES):
        stores[0].add(pending(f"a{race}"), Recorded())
        approve(stores[1], f"a{race}")
        winners.append([a.id for a in at_once(stores, spend) if a is not None])
    assert winners == [[f"a{race}"] for race in range(RACES)]
    assert stores[2].listed(Status.APPROVED) == []


@pytest.mark.redis
def test_racing_approvers_decide_once(replicas: Replicas) -> None:
    """Replicas deciding one action at once: one decision stands, the rest refused."""
    stores = [replicas() for _ in range(REPLICAS)]
    stores[0].add(pending(), Recorded())

    def decide(store: ApprovalStore) -> str:
        try:
            approve(store)
        except NotPending:
            return "refused"
        return "decided"

    outcomes = sorted(at_once(stores, decide))
    assert outcomes == ["decided"] + ["refused"] * (REPLICAS - 1)


@pytest.mark.redis
def test_an_approval_is_unusable_until_it_is_recorded(replicas: Replicas) -> None:
    """While the approval is being recorded, no replica can spend it."""
    here, there = replicas(), replicas()
    here.add(pending(), Recorded())
    during: list[PendingAction | None] = []

    def record(action: PendingAction) -> None:
        during.append(there.consume(BINDING, NOW + 1, Recorded()))

    here.decide(
        "a1", Status.APPROVED, approver="carol", reason="", now=NOW, record=record
    )
    assert during == [None]
    assert there.consume(BINDING, NOW + 1, Recorded()) is not None


@pytest.mark.redis
def test_an_approval_keeps_four_keys_that_name_nobody(replicas: Replicas) -> None:
    """An approved action: its hash and three indexes, none named after a user."""
    store = replicas()
    store.add(pending(), Recorded())
    approve(store)
    client = redis_client()
    try:
        keys = set(client.scan_iter(match=f"{store.keys.prefix}*"))
    finally:
        client.close()
    assert {key.removeprefix(store.keys.prefix) for key in keys} == {
        "approvals:action:a1",
        "approvals:status:approved",
        "approvals:due",
        f"approvals:usable:{binding_key(BINDING)}",
    }


# ---- Redis refusing, mute, dying and back -----------------------------------


def every_call(store: ApprovalStore) -> list[Callable[[], object]]:
    return [
        lambda: store.add(pending(), Recorded()),
        lambda: store.get("a1"),
        lambda: store.listed(Status.PENDING),
        lambda: approve(store),
        lambda: store.consume(BINDING, NOW, Recorded()),
        lambda: store.expire(NOW),
    ]


async def failing_calls(store: ApprovalStore) -> list[float]:
    """The time each call of the store, a wait last, took to raise StoreFailed."""
    took = []
    for call in every_call(store):
        started = time.monotonic()
        with pytest.raises(StoreFailed) as failed:
            call()
        took.append(time.monotonic() - started)
        assert failed.value.category == "store_unavailable"
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(StoreFailed):
        await store.wait("a1", 30)
    took.append(time.monotonic() - started)
    return took


async def test_a_refused_connection_fails_every_call_at_once() -> None:
    """Nothing listening: every call, a wait too, fails well within half a second."""
    store = RedisApprovalStore.connect("redis://127.0.0.1:1/0", timeout=TIMEOUT)
    try:
        took = await failing_calls(store)
    finally:
        store.close()
    assert max(took) < 0.5, took


async def test_a_mute_redis_fails_every_call_within_the_timeout() -> None:
    """A Redis that accepts and never answers: each call, a wait too, ends in time."""
    with mute_port() as port:
        store = RedisApprovalStore.connect(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        try:
            took = await failing_calls(store)
        finally:
            store.close()
    assert all(0.15 < t < 0.6 for t in took), took


def test_pending_actions_outlive_a_redis_restart(tmp_path: Path) -> None:
    """Killed and started again with persistence, Redis has every pending action.

    The same store, never reopened, fails while Redis is down and works again
    once it is back.
    """
    with redis_server(tmp_path) as server:
        store = RedisApprovalStore.connect(server.url, timeout=TIMEOUT)
        try:
            for n in range(3):
                store.add(pending(f"a{n}"), Recorded())
            server.kill()
            with pytest.raises(StoreFailed):
                store.get("a0")
            server.start()
            listed = [a.id for a in store.listed(Status.PENDING)]
            approve(store, "a1")
            spent = store.consume(BINDING, NOW + 1, Recorded())
        finally:
            store.close()
    assert listed == ["a0", "a1", "a2"]
    assert spent is not None
    assert spent.id == "a1"


async def test_a_wait_fails_when_redis_dies_under_it() -> None:
    """Redis killed during a wait: the wait ends in StoreFailed, not at its end."""

    async def kill_soon() -> None:
        await anyio.sleep(0.1)
        server.kill()

    with redis_server() as server:
        store = RedisApprovalStore.connect(server.url, timeout=TIMEOUT)
        store.add(pending(), Recorded())
        try:
            with anyio.fail_after(2):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(kill_soon)
                    with pytest.raises(StoreFailed):
                        await store.wait("a1", 30)
        finally:
            store.close()


def test_a_change_that_cannot_be_undone_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis gone between a change and its undo: the error says it stands."""
    with redis_server() as server:
        store = RedisApprovalStore.connect(server.url, timeout=TIMEOUT)
        store.add(pending(), Recorded())

        def record(action: PendingAction) -> None:
            server.kill()
            raise RecordFailed("audit sink down")

        try:
            with caplog.at_level(logging.ERROR), pytest.raises(RecordFailed):
                store.decide(
                    "a1",
                    Status.APPROVED,
                    approver="carol",
                    reason="",
                    now=NOW,
                    record=record,
                )
        finally:
            store.close()
    assert "could not be undone" in caplog.text
    assert "decision on a1" in caplog.text
