"""A bounded load test: many SDK agents against two replicas sharing Redis.

Loopback only, well under a minute; ``pytest -m load`` runs it alone.
Sixteen agents make twenty-five calls each, spread over both replicas,
mixing calls policy allows, forbids and holds for approval (those wait a
moment and answer "pending").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.harness import RunningBroker
from tests.idp import LocalIdP
from tests.replicas import SharedRedis, audit_verify, running_replicas, shared_redis
from tests.traffic import Outcome, run_agent

pytestmark = [pytest.mark.load, pytest.mark.redis]

AGENTS = 16
CALLS = 25
WAIT_SECONDS = 0.3
BUDGET_SECONDS = 60


@pytest.fixture
def redis() -> Iterator[SharedRedis]:
    with shared_redis() as shared:
        yield shared


@pytest.fixture
def pair(
    tmp_path: Path, session_idp: LocalIdP, redis: SharedRedis
) -> Iterator[list[RunningBroker]]:
    with running_replicas(tmp_path, session_idp, redis, wait=WAIT_SECONDS) as started:
        yield started


async def test_many_agents_on_two_replicas_get_only_decided_answers(
    pair: list[RunningBroker], session_idp: LocalIdP, redis: SharedRedis
) -> None:
    """400 mixed calls: each told what policy decided, each recorded exactly once."""
    outcomes: list[Outcome] = []
    agent_n = partial(run_agent, calls=CALLS)
    with anyio.fail_after(BUDGET_SECONDS):
        async with anyio.create_task_group() as tasks:
            for n in range(AGENTS):
                url = pair[n % len(pair)].url
                tasks.start_soon(agent_n, url, session_idp, f"load{n}", outcomes)
    calls = [e for e in redis.record() if e.method == "tools/call"]
    verified = audit_verify(pair[0])
    assert len(outcomes) == AGENTS * CALLS
    decided = {o.kind.decided for o in outcomes}
    unexpected = [e.detail for e in calls if e.category not in decided]
    assert [o for o in outcomes if o.category != o.kind.decided] == [], unexpected
    assert len(calls) == AGENTS * CALLS, Counter((e.outcome, e.category) for e in calls)
    assert len({e.decision_id for e in calls}) == AGENTS * CALLS
    assert verified.returncode == 0, verified.stdout + verified.stderr
