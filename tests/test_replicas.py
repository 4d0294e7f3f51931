"""End to end: two broker processes sharing one Redis, as replicas behind a balancer.

Both keep the audit record and the approvals in the Redis on 127.0.0.1:6379,
under a prefix of this module's own; each runs its own demo server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.approvals_support import (
    DELETE,
    agent_token,
    api,
    approver_token,
    first_pending,
)
from tests.harness import RunningBroker, agent
from tests.idp import LocalIdP
from tests.replicas import SharedRedis, audit_verify, running_replicas, shared_redis
from tests.traffic import category_of

pytestmark = pytest.mark.redis

WAIT_SECONDS = 2.0
RETRIES = 4


@pytest.fixture(scope="module")
def redis() -> Iterator[SharedRedis]:
    with shared_redis() as shared:
        yield shared


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    session_idp: LocalIdP,
    redis: SharedRedis,
) -> Iterator[list[RunningBroker]]:
    """Two replicas for the module; calls wait two seconds for an approver."""
    base = tmp_path_factory.mktemp("replicas")
    with running_replicas(base, session_idp, redis, wait=WAIT_SECONDS) as started:
        yield started


@pytest.fixture
def idp(pair: list[RunningBroker], session_idp: LocalIdP) -> LocalIdP:
    """The identity provider, issuing tokens for the service both replicas are."""
    return session_idp


def deletions(*replicas: RunningBroker) -> list[str]:
    """Titles the demo servers behind ``replicas`` were asked to delete."""
    return [
        r["arguments"]["title"]
        for replica in replicas
        for r in replica.downstream_saw()
        if r.get("tool") == "delete_note"
    ]


async def test_a_call_waiting_on_one_replica_is_approved_on_the_other(
    pair: list[RunningBroker], idp: LocalIdP
) -> None:
    """Listed and approved through B's API, a call waiting on A completes at once."""
    first, second = pair
    carol = approver_token(idp)
    approved_at: list[float] = []

    async def approve_on_second() -> None:
        action_id = await first_pending(second.origin, carol, "ann")
        path = f"/actions/{action_id}/approve"
        answer = await api(second.origin, carol, "POST", path)
        approved_at.append(time.monotonic())
        assert answer.status_code == 200, answer.text

    async with (
        agent(first.url, agent_token(idp, "ann")) as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(approve_on_second)
        result = await client.call_tool(DELETE, {"title": "ann's plans"})
    finished = time.monotonic()
    assert result.is_error is False, result
    assert finished - approved_at[0] < 1.0
    assert "ann's plans" in deletions(first)
    assert "ann's plans" not in deletions(second)


async def test_racing_retries_on_both_replicas_spend_one_approval(
    pair: list[RunningBroker], idp: LocalIdP
) -> None:
    """Four retries at once, two on each replica: one goes through, three wait anew."""
    first, second = pair
    token = agent_token(idp, "cy")
    arguments = {"title": "cy's plans"}
    async with agent(first.url, token) as client:
        held = await client.call_tool(DELETE, arguments)
    action_id = held.structured_content["broker"]["action_id"]
    path = f"/actions/{action_id}/approve"
    approved = await api(second.origin, approver_token(idp), "POST", path)
    results: list[Any] = []

    async def retry(client: Client) -> None:
        results.append(await client.call_tool(DELETE, arguments))

    async with AsyncExitStack() as clients:
        ready = [
            await clients.enter_async_context(agent(replica.url, token))
            for replica in [first, second] * (RETRIES // 2)
        ]
        async with anyio.create_task_group() as tasks:
            for client in ready:
                tasks.start_soon(retry, client)
    assert category_of(held) == "pending_approval"
    assert approved.status_code == 200, approved.text
    assert sorted(category_of(r) for r in results) == [
        "allowed",
        *["pending_approval"] * (RETRIES - 1),
    ]
    assert deletions(first, second).count("cy's plans") == 1


async def test_the_replicas_record_one_chain(
    pair: list[RunningBroker], idp: LocalIdP, redis: SharedRedis
) -> None:
    """Calls on both replicas land in one record, which verifies as one chain."""
    token = agent_token(idp, "eve")
    for n, replica in enumerate(pair):
        async with agent(replica.url, token) as client:
            await client.call_tool("demo.echo", {"text": f"via replica {n}"})
    checks = [audit_verify(replica) for replica in pair]
    record = redis.record()
    echoed = [
        e.arguments for e in record if e.method == "tools/call" and e.subject == "eve"
    ]
    for done in checks:
        assert done.returncode == 0, done.stdout + done.stderr
        checked = re.search(r"chain intact: (\d+) entries checked", done.stdout)
        assert checked is not None, done.stdout
        assert int(checked.group(1)) == len(record)
    assert echoed == [{"text": "via replica 0"}, {"text": "via replica 1"}]
