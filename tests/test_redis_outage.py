"""End to end: a broker whose Redis dies mid-traffic, or never answers at all.

The Redis killed here is the test's own ``redis-server`` on a free port,
never the shared one on 6379. It keeps an append-only file, so what it
held before the kill is there again when it starts on the same port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.approvals_support import DELETE, agent_token, api, approver_token
from tests.harness import RunningBroker, agent
from tests.idp import LocalIdP
from tests.redis_support import RedisServer, mute_port, new_prefix, redis_server
from tests.replicas import SharedRedis, audit_verify, running_replicas
from tests.traffic import KINDS, Outcome, call_once, category_of, run_agent
from tests.waiting import readyz

AGENTS = 3
WAIT_SECONDS = 0.3
# Seconds of traffic before the kill, and of Redis staying dead.
BEFORE_KILL = 1.5
DEAD_FOR = 2.0
# What an agent may be told while the store is gone, besides the decisions.
OUTAGE_CATEGORIES = {"record_unavailable", "store_unavailable"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, keeping an append-only file in ``tmp_path``."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with redis_server(directory) as server:
        yield server


@pytest.fixture
def broker(
    tmp_path: Path, session_idp: LocalIdP, own_redis: RedisServer
) -> Iterator[RunningBroker]:
    """One broker keeping its record and approvals in the test's own Redis."""
    shared = SharedRedis(own_redis.url, new_prefix())
    with running_replicas(
        tmp_path, session_idp, shared, count=1, wait=WAIT_SECONDS
    ) as (started,):
        yield started


async def held_calls(broker: RunningBroker, idp: LocalIdP) -> list[str]:
    """Three calls held for approval before anything goes wrong; their action ids."""
    ids = []
    async with agent(broker.url, agent_token(idp, "pat")) as client:
        for n in range(3):
            result = await client.call_tool(DELETE, {"title": f"pat's note {n}"})
            assert category_of(result) == "pending_approval"
            ids.append(result.structured_content["broker"]["action_id"])
    return ids


async def resumed(broker: RunningBroker, idp: LocalIdP) -> float:
    """Wait until an allowed call goes through again; when it did."""
    async with agent(broker.url, agent_token(idp, "tia")) as client:
        while True:
            done = await call_once(client, KINDS[0], "are we back")
            if done.went_through:
                return done.ended
            await anyio.sleep(0.1)


def seen_tools(broker: RunningBroker) -> set[str]:
    return {str(r.get("tool")) for r in broker.downstream_saw() if r.get("tool")}


@dataclass
class Outage:
    """Calls made while Redis was killed and started again, and the timeline."""

    outcomes: list[Outcome]
    killed: float
    restarted: float
    resumed: float
    readiness: tuple[int, dict[str, Any]]  # /readyz while Redis was dead

    def during(self) -> list[Outcome]:
        """Calls sent after the kill and answered before the restart."""
        return [
            o
            for o in self.outcomes
            if self.killed < o.started and o.ended < self.restarted
        ]


async def through_an_outage(
    broker: RunningBroker, idp: LocalIdP, redis: RedisServer
) -> Outage:
    """Agents call all along while Redis is killed, left dead, and started again."""
    outcomes: list[Outcome] = []
    stop = anyio.Event()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            for n in range(AGENTS):
                agent_n = partial(run_agent, until=stop)
                tasks.start_soon(agent_n, broker.url, idp, f"ag{n}", outcomes)
            await anyio.sleep(BEFORE_KILL)
            killed = time.monotonic()
            redis.kill()
            await anyio.sleep(DEAD_FOR)
            readiness = readyz(broker)
            restarted = time.monotonic()
            redis.start()
            back = await resumed(broker, idp)
            stop.set()
    return Outage(outcomes, killed, restarted, back, readiness)


async def test_killing_redis_mid_traffic_denies_and_loses_nothing(
    broker: RunningBroker, session_idp: LocalIdP, own_redis: RedisServer
) -> None:
    """SIGKILL under traffic: calls denied as such, none let through, none lost.

    Once Redis is back on the same port the same broker, never restarted,
    allows calls again, and the calls held before the kill are still
    pending and can be approved and retried.
    """
    held = await held_calls(broker, session_idp)
    outage = await through_an_outage(broker, session_idp, own_redis)
    status, body = outage.readiness
    assert any(o.went_through for o in outage.outcomes if o.ended < outage.killed)
    assert len(outage.during()) >= AGENTS
    assert {(o.kind.name, o.category) for o in outage.during()} == {
        ("allowed", "record_unavailable"),
        ("denied", "forbidden"),
        ("approval", "store_unavailable"),
    }
    for o in outage.outcomes:
        assert o.category in {o.kind.decided} | OUTAGE_CATEGORIES, o
    assert seen_tools(broker) <= {"echo"}
    assert (status, body["record"]["writable"]) == (503, False)
    assert outage.resumed - outage.restarted < 10

    carol = approver_token(session_idp)
    listed = (await api(broker.origin, carol, "GET", "/actions")).json()["actions"]
    approved = await api(broker.origin, carol, "POST", f"/actions/{held[0]}/approve")
    async with agent(broker.url, agent_token(session_idp, "pat")) as client:
        retried = await client.call_tool(DELETE, {"title": "pat's note 0"})
    verified = audit_verify(broker)
    assert set(held) <= {a["id"] for a in listed}
    assert approved.status_code == 200, approved.text
    assert category_of(retried) == "allowed"
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_mute_redis_denies_calls_within_the_timeouts(
    tmp_path: Path, session_idp: LocalIdP
) -> None:
    """Redis accepts and never answers: every kind of call is denied in time.

    The broker starts anyway, reports itself not ready, and answers each
    call within a few of its 0.25 s timeouts instead of hanging.
    """
    with mute_port() as port:
        shared = SharedRedis(f"redis://127.0.0.1:{port}/0", new_prefix())
        with running_replicas(
            tmp_path, session_idp, shared, count=1, timeout=0.25, wait_ready=False
        ) as (broker,):
            outcomes: list[Outcome] = []
            async with agent(broker.url, agent_token(session_idp, "mo")) as client:
                for kind in KINDS:
                    outcomes.append(await call_once(client, kind, "mute"))
            status, _ = readyz(broker)
            downstream = seen_tools(broker)
    categories = [o.category for o in outcomes]
    assert categories == ["record_unavailable", "forbidden", "store_unavailable"]
    assert all(o.ended - o.started < 2.0 for o in outcomes), outcomes
    assert status == 503
    assert downstream == set()
